-- Stores a new state of a sync; a terminal one also ends the project's active sync,
-- and its follow-up (if any) becomes active with its job on the stream, in one step.
-- KEYS[1] sync record, KEYS[2] project hash, KEYS[3] project lock, KEYS[4] jobs stream
-- ARGV[1] record json, ARGV[2] terminal ('1'/'0'), ARGV[3] sync id, ARGV[4] status,
-- ARGV[5] finished_at ('' = none), ARGV[6] commit ('' = none), ARGV[7] fence ('' = unfenced)
-- Returns 1 stored, 0 record gone (project deleted), -1 fenced (the lock is not ours).
if ARGV[7] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[7] then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
    if redis.call('HGET', KEYS[2], 'active_sync') == ARGV[3] then
        local follow_up = redis.call('HGET', KEYS[2], 'follow_up')
        if follow_up then
            local job = redis.call('HGET', KEYS[2], 'follow_up_job')
            redis.call('HSET', KEYS[2], 'active_sync', follow_up)
            redis.call('HDEL', KEYS[2], 'follow_up', 'follow_up_job')
            if job then redis.call('XADD', KEYS[4], '*', 'job', job) end
        else
            redis.call('HDEL', KEYS[2], 'active_sync')
        end
    elseif redis.call('HGET', KEYS[2], 'follow_up') == ARGV[3] then
        redis.call('HDEL', KEYS[2], 'follow_up', 'follow_up_job')
    end
    redis.call('HSET', KEYS[2], 'last_status', ARGV[4])
    if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'last_synced_at', ARGV[5]) end
    if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'commit', ARGV[6]) end
end
return 1
