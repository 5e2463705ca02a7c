-- Renews a running job's project lock and resets its queue entry's idle time, only
-- while the lock is ours: a worker that lost it must not claim the entry back.
-- KEYS[1] the project lock, KEYS[2] the jobs stream the entry is on
-- ARGV[1] fence, ARGV[2] lock ttl ms, ARGV[3] group, ARGV[4] consumer, ARGV[5] entry id
-- Returns 1 while held, 0 when the lock is gone.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[5], 'JUSTID')
return 1
