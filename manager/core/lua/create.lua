-- A run's record, created within its fan-out budget (charged first; nothing is stored
-- when the budget is spent) unless its dedup key already names a run.
local k = {record = KEYS[1], index = KEYS[2], inflight = KEYS[3], waiting = KEYS[4],
           dedup = KEYS[5], budget = KEYS[6], charged = KEYS[7],  -- '' when not used
           all = KEYS[8]}  -- every plugin's runs (the console's list)
-- {id, ttl, created_at, index_cap, dedup_ttl, due_in, record_prefix, charge: {runs,
-- budget, ttl} or absent, fields: {name: JSON}}
local a = cjson.decode(ARGV[1])
if a.charge then
  local used = charge(k.budget, k.charged, a.charge.runs, a.charge.ttl)
  if used > a.charge.budget then return {-1, used, false} end
end
if k.dedup ~= '' then
  local existing = redis.call('GET', k.dedup)
  if existing then
    return {0, existing, status_of(a.record_prefix .. existing) or false}
  end
  redis.call('SET', k.dedup, a.id, 'EX', a.dedup_ttl)
end
local ahead = redis.call('ZCARD', line_of(k.waiting, cjson.decode(a.fields.plugin)))
hset_fields(k.record, a.fields)
status_changed(k.record, k.waiting, a.id, nil, status_of(k.record))
redis.call('EXPIRE', k.record, a.ttl)
for _, index in ipairs({k.index, k.all}) do
  redis.call('ZADD', index, a.created_at, a.id)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', a.created_at - a.ttl)
  redis.call('ZREMRANGEBYRANK', index, 0, -a.index_cap - 1)
  redis.call('EXPIRE', index, a.ttl)
end
redis.call('ZADD', k.inflight, now() + a.due_in, a.id)  -- the sweeper's, on Redis's clock
return {1, a.id, false, ahead}  -- ahead: runs of its plugin before it in line
