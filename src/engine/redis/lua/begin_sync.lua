-- Starts a sync of a project in one step: joins the queued one, or the follow-up of a
-- running one, or stores the new sync — as the follow-up of a running one (queued when
-- that one ends), else as the active sync with its job on the stream.
-- KEYS[1] project hash, KEYS[2] the new sync's record, KEYS[3] the project's sync index,
-- KEYS[4] the jobs stream
-- ARGV[1] record json, ARGV[2] sync id, ARGV[3] sync key prefix, ARGV[4] job json
-- Returns {1} stored and queued, {2} stored as the follow-up, {0, record json} joined
-- an existing sync, {-1} when the project is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local function unfinished(id)
    if not id then return nil end
    local raw = redis.call('GET', ARGV[3] .. id)
    if not raw then return nil end
    local status = cjson.decode(raw)['status']
    if status == 'completed' or status == 'failed' then return nil end
    return raw, status
end
local active, status = unfinished(redis.call('HGET', KEYS[1], 'active_sync'))
if active and status == 'queued' then return {0, active} end
if active then
    local follow_up = unfinished(redis.call('HGET', KEYS[1], 'follow_up'))
    if follow_up then return {0, follow_up} end
    redis.call('HSET', KEYS[1], 'follow_up', ARGV[2], 'follow_up_job', ARGV[4])
    redis.call('SET', KEYS[2], ARGV[1])
    redis.call('ZADD', KEYS[3], 0, ARGV[2])
    return {2}
end
redis.call('HSET', KEYS[1], 'active_sync', ARGV[2])
redis.call('HDEL', KEYS[1], 'follow_up', 'follow_up_job')
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
redis.call('XADD', KEYS[4], '*', 'job', ARGV[4])
return {1}
