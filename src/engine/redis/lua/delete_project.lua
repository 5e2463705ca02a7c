-- Removes a project, its sync records and its schedule (the caller then takes it off
-- its owner's list, which lives in the owner's slot).
-- KEYS[1] project hash, KEYS[2] the project's sync index, KEYS[3] the due set,
-- KEYS[4] the shard's project set, KEYS[5..] every sync record the caller read from
-- the index
-- ARGV[1] project id
-- Returns 1, or -2 when the index changed since the caller read it (read again).
if redis.call('ZCARD', KEYS[2]) ~= #KEYS - 4 then return -2 end
for i = 5, #KEYS do
    redis.call('DEL', KEYS[i])
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
