-- Writes a changed project (settings, schedule) if nobody changed it since the caller
-- read it, and moves its place in the due set.
-- KEYS[1] project hash, KEYS[2] due set
-- ARGV[1] the rev the caller read, ARGV[2] registration json, ARGV[3] fresh json,
-- ARGV[4] next due ms ('' = not scheduled), ARGV[5] project id
-- Returns 1 written, 0 the project is gone, -2 it changed meanwhile (read again).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'rev') or '0') ~= ARGV[1] then return -2 end
redis.call('HSET', KEYS[1], 'json', ARGV[2], 'fresh', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'rev', 1)
if ARGV[4] == '' then
    redis.call('ZREM', KEYS[2], ARGV[5])
else
    redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
end
return 1
