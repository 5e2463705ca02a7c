-- Starts a sync of a project in one step: joins the queued one, or the follow-up of a
-- running one, or stores the new sync — as the follow-up of a running one (queued when
-- that one ends), else as the active sync with its job on the stream.
-- KEYS[1] project hash, KEYS[2] the new sync's record, KEYS[3] the project's sync index,
-- KEYS[4] the jobs stream, KEYS[5] the stream's bell channel, KEYS[6] the record of the
-- active sync the caller read (KEYS[1] when none), KEYS[7] the record of the follow-up
-- the caller read (KEYS[1] when none)
-- ARGV[1] record json, ARGV[2] sync id, ARGV[3] job json, ARGV[4] the active sync id
-- the caller read ('' = none), ARGV[5] the follow-up id it read ('' = none),
-- ARGV[6] '1' to ring the bell (a cluster's workers wait on it)
-- Returns {1} stored and queued, {2} stored as the follow-up, {0, record json} joined
-- an existing sync, {-1} when the project is gone, {-2} when the active sync or the
-- follow-up changed since the caller read them (read again).
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if (redis.call('HGET', KEYS[1], 'active_sync') or '') ~= ARGV[4]
    or (redis.call('HGET', KEYS[1], 'follow_up') or '') ~= ARGV[5] then
    return {-2}
end
local function unfinished(id, key)
    if id == '' then return nil end
    local raw = redis.call('GET', key)
    if not raw then return nil end
    local status = cjson.decode(raw)['status']
    if status == 'completed' or status == 'failed' then return nil end
    return raw, status
end
local active, status = unfinished(ARGV[4], KEYS[6])
if active and status == 'queued' then return {0, active} end
if active then
    local follow_up = unfinished(ARGV[5], KEYS[7])
    if follow_up then return {0, follow_up} end
    redis.call('HSET', KEYS[1], 'follow_up', ARGV[2], 'follow_up_job', ARGV[3])
    redis.call('SET', KEYS[2], ARGV[1])
    redis.call('ZADD', KEYS[3], 0, ARGV[2])
    return {2}
end
redis.call('HSET', KEYS[1], 'active_sync', ARGV[2])
redis.call('HDEL', KEYS[1], 'follow_up', 'follow_up_job')
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
redis.call('XADD', KEYS[4], '*', 'job', ARGV[3])
if ARGV[6] == '1' then redis.call('SPUBLISH', KEYS[5], '1') end
return {1}
