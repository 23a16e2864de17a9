-- A run to be sent again `after` seconds from now, on Redis's clock: its request kept,
-- its time scored. Replaces an earlier entry of the same run.
local k = {later = KEYS[1], requests = KEYS[2]}
local a = cjson.decode(ARGV[1])  -- {id, request, after}
redis.call('HSET', k.requests, a.id, a.request)
redis.call('ZADD', k.later, now() + a.after, a.id)
return 1
