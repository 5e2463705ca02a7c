-- Removes a project, its sync records, its place in its owner's list and its schedule.
-- KEYS[1] project hash, KEYS[2] the project's sync index, KEYS[3] owner's project set,
-- KEYS[4] the due set
-- ARGV[1] project id, ARGV[2] sync key prefix
-- Returns 1.
for _, sync in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    redis.call('DEL', ARGV[2] .. sync)
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
