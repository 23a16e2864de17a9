-- A run in progress, held by the process executing it: its lease (who holds it, for the
-- sweeper and for a second delivery) and its worker slot's lease (on Redis's clock),
-- renewed together every few seconds; a process that dies stops renewing both.
local k = {lease = KEYS[1], slots = KEYS[2]}
-- {id, holder, lease_ttl, slot_lease_s, take: set the lease even when there is none (a
-- takeover); else only renew it: a run whose outcome was stored meanwhile stays let go}
local a = cjson.decode(ARGV[1])
if a.take then redis.call('SET', k.lease, a.holder, 'EX', a.lease_ttl)
else redis.call('SET', k.lease, a.holder, 'EX', a.lease_ttl, 'XX') end
redis.call('ZADD', k.slots, 'XX', now() + a.slot_lease_s, a.id)
return 1
