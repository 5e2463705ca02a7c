-- Claims the projects due now: each moves to ARGV[3] in the due set, so no node takes
-- it again until the sync it starts sets its real next time (or the hold runs out,
-- if the claiming node died before starting it). Reads only the due entries.
-- KEYS[1] due set
-- ARGV[1] now ms, ARGV[2] at most this many, ARGV[3] held until ms
-- Returns the claimed project ids, each followed by the time it was due.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #due, 2 do
    redis.call('ZADD', KEYS[1], ARGV[3], due[i])
end
return due
