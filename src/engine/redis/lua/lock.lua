-- Takes a project's mirror lock with a fencing token newer than any before.
-- KEYS[1] the project lock, KEYS[2] the project's last fence
-- ARGV[1] lock ttl ms
-- Returns the new fence (a string), or false while the lock is held. The fence is the
-- server clock in µs, kept above the last grant.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local t = redis.call('TIME')
local fence = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if fence <= last then fence = last + 1 end
local s = string.format('%.0f', fence)
redis.call('SET', KEYS[2], s)
redis.call('SET', KEYS[1], s, 'PX', ARGV[1])
return s
