-- Gives a project lock up, if it is still this fence's.
-- KEYS[1] the project lock
-- ARGV[1] fence
-- Returns 1.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
