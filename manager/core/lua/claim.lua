-- A delivery takes its run: the record as it was and, when its status is one of the
-- claimable ones and a slot is granted, the run marked running with the attempt counted.
-- Returns {grant ('' when not claimable), the record's hash as it was}.
local k = {record = KEYS[1], inflight = KEYS[2], waiting = KEYS[3], slots = KEYS[4],
           workers = KEYS[5], lease = KEYS[6]}
-- {id, sources, fields, due_in, ask: acquire_slot's, holder, lease_ttl}
local a = cjson.decode(ARGV[1])
local before = redis.call('HGETALL', k.record)
local found = status_of(k.record)
if not found or not set_of(a.sources)[found] then return {'', before} end
local grant = acquire_slot(k.slots, k.waiting, k.workers, a.ask)
if grant ~= 'granted' then return {grant, before} end
a.increment = 'attempts'
transition(k.record, k.inflight, k.waiting, a.id, a)
redis.call('SET', k.lease, a.holder, 'EX', a.lease_ttl)  -- held: renewed while it runs
return {grant, before}
