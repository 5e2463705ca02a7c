-- GCRA rate limit on the server's clock.
-- KEYS[1] the user's theoretical arrival time
-- ARGV[1] emission interval µs, ARGV[2] burst tolerance µs
-- Returns -1 when admitted, else µs to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat - burst
if now < allow_at then return allow_at - now end
local next_tat = tat + interval
local ttl_ms = math.ceil((next_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', ttl_ms)
return -1
