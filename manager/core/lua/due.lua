-- The runs whose time to be sent again has come (Redis's clock), at most `limit`, taken:
-- each is returned to one caller only.
local k = {later = KEYS[1], requests = KEYS[2]}
local a = cjson.decode(ARGV[1])  -- {limit}
local ids = redis.call('ZRANGEBYSCORE', k.later, '-inf', now(), 'LIMIT', 0, a.limit)
local out = {}
for _, id in ipairs(ids) do
  local request = redis.call('HGET', k.requests, id)
  redis.call('ZREM', k.later, id)
  redis.call('HDEL', k.requests, id)
  if request then out[#out + 1] = request end
end
return out
