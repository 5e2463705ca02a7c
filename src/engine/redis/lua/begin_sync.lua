-- Starts a sync of a project, or joins the one already queued or running.
-- KEYS[1] project hash, KEYS[2] the new sync's record, KEYS[3] the project's sync index
-- ARGV[1] record json, ARGV[2] sync id, ARGV[3] sync key prefix
-- Returns {1} when stored, {0, active record json} when a sync is already queued or
-- running, {-1} when the project is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local active = redis.call('HGET', KEYS[1], 'active_sync')
if active then
    local raw = redis.call('GET', ARGV[3] .. active)
    if raw then return {0, raw} end
end
redis.call('HSET', KEYS[1], 'active_sync', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
return {1}
