"""The Lua scripts behind RecordStore (manager.core.records): each change of a record is
one atomic script, checked against the transition table it is handed."""

STATES = "|{}|"

# Runs waiting in the queue (status queued), counted per plugin in one hash as part of
# every status change, so the count is exact: the fair share (workers.slots) reads it to
# know whether another plugin has a run waiting its turn. A throttled run is not counted:
# it already had its turn and waits for a slot it may not take.
_WAITING = """
local WAITING = {['"queued"'] = true}
local function count_waiting(record, hash, from, to)
  local before, after = from and WAITING[from] or false, to and WAITING[to] or false
  if before == after then return end
  local plugin = cjson.decode(redis.call('HGET', record, 'plugin'))
  if redis.call('HINCRBY', hash, plugin, after and 1 or -1) <= 0 then
    redis.call('HDEL', hash, plugin)
  end
end
"""

# KEYS: record, plugin index, inflight, waiting, [dedup]. ARGV: id, ttl, now, index cap,
# dedup ttl, deadline, record key prefix, field/value pairs...
CREATE = _WAITING + """
if #KEYS == 5 then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    return {0, existing, redis.call('HGET', ARGV[7] .. existing, 'status')}
  end
  redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[5])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
count_waiting(KEYS[1], KEYS[4], nil, redis.call('HGET', KEYS[1], 'status'))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3] - ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[4]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return {1, ARGV[1], false}
"""

# KEYS: record, inflight, waiting. ARGV: allowed sources, id, deadline ('' keep, '-' drop),
# field to increment (''), expected worker (''), field/value pairs (status first)...
TRANSITION = _WAITING + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, false} end
if not string.find(ARGV[1], '|' .. cur .. '|', 1, true) then return {0, cur} end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then return {0, cur} end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[4], 1) end
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
count_waiting(KEYS[1], KEYS[3], cur, redis.call('HGET', KEYS[1], 'status'))
if ARGV[3] == '-' then redis.call('ZREM', KEYS[2], ARGV[2])
elseif ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2]) end
return {1, cur}
"""

# KEYS: record, inflight, stream, waiting. ARGV: allowed sources, id, maxlen, n events,
# events..., field/value pairs... One script: the events and the terminal record land
# together or not at all.
FINISH = _WAITING + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, false} end
if not string.find(ARGV[1], '|' .. cur .. '|', 1, true) then return {0, cur} end
local n = tonumber(ARGV[4])
for i = 5, 4 + n do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[i])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5 + n))
count_waiting(KEYS[1], KEYS[4], cur, nil)
redis.call('ZREM', KEYS[2], ARGV[2])
return {1, cur}
"""
