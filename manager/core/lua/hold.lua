-- A run in progress, held by the process executing it: its lease (who holds it, for the
-- sweeper and for a second delivery), its worker slot's lease and its sweeper deadline
-- (on Redis's clock), renewed together every few seconds; a process that dies stops
-- renewing all three, so the sweeper finds its run one lease after the lease lapsed.
local k = {lease = KEYS[1], slots = KEYS[2], inflight = KEYS[3], record = KEYS[4]}
-- {id, holder, lease_ttl, slot_lease_s, held_for, take: set the lease even when there
-- is none (a takeover); else only renew it: a run whose outcome was stored, or that was
-- taken over or re-queued meanwhile, stays let go}
local a = cjson.decode(ARGV[1])
local held
if a.take then held = redis.call('SET', k.lease, a.holder, 'EX', a.lease_ttl)
else
  held = redis.call('SET', k.lease, a.holder, 'EX', a.lease_ttl, 'XX')
  if not held and status_of(k.record) == 'running' then
    -- a lease lost with a failover (a replica promoted before it had the last renewals):
    -- the live holder takes it back while the record still says the run is its own
    local worker = redis.call('HGET', k.record, 'worker')
    if worker and cjson.decode(worker) == a.holder then
      held = redis.call('SET', k.lease, a.holder, 'EX', a.lease_ttl)
    end
  end
end
redis.call('ZADD', k.slots, 'XX', now() + a.slot_lease_s, a.id)
if held then redis.call('ZADD', k.inflight, 'XX', now() + a.held_for, a.id) end
return 1
