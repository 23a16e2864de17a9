-- A run's end, stored once: the terminal record and its events land together or not at
-- all; the delivery's worker slot (if any) is freed in the same step, whatever it finds.
local k = {record = KEYS[1], inflight = KEYS[2], stream = KEYS[3], waiting = KEYS[4],
           slots = KEYS[5], lease = KEYS[6]}  -- slots: '' when the delivery holds none
-- {id, sources, maxlen, events: [encoded event], fields}
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
return {1, found}
