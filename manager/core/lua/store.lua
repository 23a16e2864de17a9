-- A run's end, stored once: the terminal record and its events land together or not at
-- all; the delivery's worker slot (if any) is freed in the same step, whatever it finds.
local k = {record = KEYS[1], inflight = KEYS[2], stream = KEYS[3], waiting = KEYS[4],
           slots = KEYS[5], lease = KEYS[6], minute = KEYS[7]}
-- slots: '' when the delivery holds none; minute: the console's count of runs ended in the
-- minute this one ended (manager/core/stats.py)
-- {id, sources, maxlen, events: [encoded event], stats_ttl, fields}
local a = cjson.decode(ARGV[1])
if k.slots ~= '' then redis.call('ZREM', k.slots, a.id) end
redis.call('DEL', k.lease)  -- nobody holds a run that has ended
local found = status_of(k.record)
if not found then return {0, false} end
if not set_of(a.sources)[found] then return {0, found} end
for _, event in ipairs(a.events) do
  redis.call('XADD', k.stream, 'MAXLEN', '~', a.maxlen, '*', 'event', event)
end
hset_fields(k.record, a.fields)
status_changed(k.record, k.waiting, a.id, found, nil)
redis.call('ZREM', k.inflight, a.id)
redis.call('HINCRBY', k.minute, 'ended', 1)
if a.fields.status ~= '"succeeded"' then redis.call('HINCRBY', k.minute, 'failed', 1) end
if a.fields.warm == 'true' then redis.call('HINCRBY', k.minute, 'warm', 1) end
if a.fields.warm == 'false' then redis.call('HINCRBY', k.minute, 'cold', 1) end
redis.call('EXPIRE', k.minute, a.stats_ttl)
return {1, found}
