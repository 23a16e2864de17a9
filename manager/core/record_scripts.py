"""The Lua scripts behind RecordStore (manager.core.records): each change of a record is
one atomic script, checked against the transition table it is handed."""

STATES = "|{}|"

# KEYS: record, plugin index, inflight, [dedup]. ARGV: id, ttl, now, index cap, dedup ttl,
# deadline, record key prefix, field/value pairs...
CREATE = """
if #KEYS == 4 then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    return {0, existing, redis.call('HGET', ARGV[7] .. existing, 'status')}
  end
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[5])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3] - ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[4]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return {1, ARGV[1], false}
"""

# KEYS: record, inflight. ARGV: allowed sources, id, deadline ('' keep, '-' drop),
# field to increment (''), expected worker (''), field/value pairs...
TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, false} end
if not string.find(ARGV[1], '|' .. cur .. '|', 1, true) then return {0, cur} end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then return {0, cur} end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[4], 1) end
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
if ARGV[3] == '-' then redis.call('ZREM', KEYS[2], ARGV[2])
elseif ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2]) end
return {1, cur}
"""

# KEYS: record, inflight, stream. ARGV: allowed sources, id, maxlen, n events,
# events..., field/value pairs... One script: the events and the terminal record land
# together or not at all.
FINISH = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, false} end
if not string.find(ARGV[1], '|' .. cur .. '|', 1, true) then return {0, cur} end
local n = tonumber(ARGV[4])
for i = 5, 4 + n do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[i])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5 + n))
redis.call('ZREM', KEYS[2], ARGV[2])
return {1, cur}
"""
