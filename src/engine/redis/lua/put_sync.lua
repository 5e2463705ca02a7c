-- Stores a new state of a sync; a terminal one also ends the project's active sync,
-- and its follow-up (if any) becomes active with its job on the stream, in one step.
-- The first time a sync is stored as ended, the project's status and schedule (the
-- `fresh` field, computed by the caller from the project at revision ARGV[8]) are
-- written too, and its place in the due set moves.
-- KEYS[1] sync record, KEYS[2] project hash, KEYS[3] project lock, KEYS[4] jobs stream,
-- KEYS[5] due set, KEYS[6] the stream's bell channel
-- ARGV[1] record json, ARGV[2] terminal ('1'/'0'), ARGV[3] sync id, ARGV[4] status,
-- ARGV[5] finished_at ('' = none), ARGV[6] commit ('' = none), ARGV[7] fence ('' = unfenced),
-- ARGV[8] the project's rev the caller read ('' = no project), ARGV[9] fresh json,
-- ARGV[10] next due ms ('' = not scheduled), ARGV[11] project id, ARGV[12] '1' to
-- ring the bell when a follow-up's job is queued
-- Returns 2 stored with the project's status (its first end), 1 stored, 0 record gone (project deleted), -1 fenced (the lock is not ours),
-- -2 the project changed since the caller read it (read again and retry).
if ARGV[7] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[7] then return -1 end
local before = redis.call('GET', KEYS[1])
if not before then return 0 end
local was = cjson.decode(before)['status']
local first_end = ARGV[2] == '1' and was ~= 'completed' and was ~= 'failed'
local project_exists = redis.call('EXISTS', KEYS[2]) == 1
if first_end and project_exists and (redis.call('HGET', KEYS[2], 'rev') or '0') ~= ARGV[8] then
    return -2
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] == '1' and project_exists then
    if redis.call('HGET', KEYS[2], 'active_sync') == ARGV[3] then
        local follow_up = redis.call('HGET', KEYS[2], 'follow_up')
        if follow_up then
            local job = redis.call('HGET', KEYS[2], 'follow_up_job')
            redis.call('HSET', KEYS[2], 'active_sync', follow_up)
            redis.call('HDEL', KEYS[2], 'follow_up', 'follow_up_job')
            if job then
                redis.call('XADD', KEYS[4], '*', 'job', job)
                if ARGV[12] == '1' then redis.call('SPUBLISH', KEYS[6], '1') end
            end
        else
            redis.call('HDEL', KEYS[2], 'active_sync')
        end
    elseif redis.call('HGET', KEYS[2], 'follow_up') == ARGV[3] then
        redis.call('HDEL', KEYS[2], 'follow_up', 'follow_up_job')
    end
    redis.call('HSET', KEYS[2], 'last_status', ARGV[4])
    if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'last_synced_at', ARGV[5]) end
    if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'commit', ARGV[6]) end
    if first_end then
        redis.call('HSET', KEYS[2], 'fresh', ARGV[9])
        redis.call('HINCRBY', KEYS[2], 'rev', 1)
        if ARGV[10] == '' then
            redis.call('ZREM', KEYS[5], ARGV[11])
        else
            redis.call('ZADD', KEYS[5], ARGV[10], ARGV[11])
        end
        return 2
    end
end
return 1
