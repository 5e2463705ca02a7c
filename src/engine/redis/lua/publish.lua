-- Numbers an event in its user's sequence, keeps it in the user's history and
-- publishes it, in one step so ids reach the history and the channel in order.
-- KEYS[1] the user's event sequence, KEYS[2] the user's event stream, KEYS[3] channel
-- (on a cluster, the sharded channel of the user's group, in the same slot),
-- KEYS[4] optional: the event's once key (in the user's slot)
-- ARGV[1] body json (an object), ARGV[2] channel payload prefix, ARGV[3] history length,
-- ARGV[4] 'SPUBLISH' on a cluster, else 'PUBLISH', ARGV[5] with KEYS[4]: seconds the
-- once key is kept
-- Returns the event id: with KEYS[4] already set (a retry of a publish that went
-- through), the id it was given then, and nothing is published again.
if KEYS[4] then
  local kept = redis.call('GET', KEYS[4])
  if kept then
    return tonumber(kept)
  end
end
local id = redis.call('INCR', KEYS[1])
local sid = string.format('%d', id)
local event = '{"id":' .. sid .. ',' .. string.sub(ARGV[1], 2)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. sid, 'e', event)
redis.call(ARGV[4], KEYS[3], ARGV[2] .. event)
if KEYS[4] then
  redis.call('SET', KEYS[4], sid, 'EX', ARGV[5])
end
return id
