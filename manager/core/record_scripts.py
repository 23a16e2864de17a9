"""The Lua scripts behind RecordStore (manager.core.record_store): each change of a record
is one atomic script, checked against the transition table it is handed. The rules a
change may depend on (the fan-out budget, a worker slot) are Lua functions here too, so
the step that checks them and the step that changes the record are one round trip and
one atomic step: a run is created only within its budget, and claimed only with a slot."""

STATES = "|{}|"

# Runs waiting in the queue (status queued), counted per plugin in one hash as part of
# every status change, so the count is exact: the fair share (acquire_slot) reads it to
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

# The fan-out budget: `runs` more for a correlation (its counter), counted once per stream
# entry however often it is delivered (a second charge finds what the first counted; no
# entry key: counted every time). Returns the runs counted so far.
_CHARGE = """
local function charge(counter, charged, runs, ttl)
  if charged ~= '' then
    local before = redis.call('GET', charged)
    if before then return tonumber(before) end
  end
  local used = redis.call('INCRBY', counter, runs)
  redis.call('EXPIRE', counter, ttl, 'NX')
  if charged ~= '' then redis.call('SET', charged, used, 'EX', ttl) end
  return used
end
"""

# Worker slots (manager.core.slots). Expired leases (a worker that died holding one) are
# dropped first, so a crash never leaks a slot for long. Returns 'granted', 'concurrency'
# (the manifest's cap) or 'share' (over the fair share while another plugin waits).
_SLOT = """
local function acquire_slot(slots, waiting, workers, now, cap, id, expiry, share, plugin, ttl)
  now, cap = tonumber(now), tonumber(cap)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if redis.call('ZSCORE', slots, id) then return 'granted' end
  local held = redis.call('ZCARD', slots)
  if cap > 0 and held >= cap then return 'concurrency' end
  local counts = redis.call('HGETALL', waiting)
  local others = false
  for i = 1, #counts, 2 do
    if counts[i] ~= plugin and tonumber(counts[i + 1]) > 0 then others = true; break end
  end
  if others then
    local total = 0
    local beats = redis.call('HGETALL', workers)
    for i = 1, #beats, 2 do
      local n, at = string.match(beats[i + 1], '^(%d+) ([%d.]+)$')
      if n and tonumber(at) > now - tonumber(ttl) then total = total + tonumber(n) end
    end
    if held >= math.max(1, math.floor(total * tonumber(share))) then return 'share' end
  end
  redis.call('ZADD', slots, expiry, id)
  redis.call('EXPIRE', slots, math.ceil(tonumber(expiry) - now) + 60)
  return 'granted'
end
"""

# One transition: applied only from one of `states`; `owner` makes it a compare-and-set
# on the record's worker; `deadline` re-arms the sweeper's clock ('' keep, '-' drop).
# The field/value pairs (status first) are ARGV[first..].
_TRANSITION = """
local function transition(record, inflight, waiting, states, id, deadline, increment, owner,
                          first)
  local cur = redis.call('HGET', record, 'status')
  if not cur then return {0, false} end
  if not string.find(states, '|' .. cur .. '|', 1, true) then return {0, cur} end
  if owner ~= '' and redis.call('HGET', record, 'worker') ~= owner then return {0, cur} end
  if increment ~= '' then redis.call('HINCRBY', record, increment, 1) end
  if #ARGV >= first then redis.call('HSET', record, unpack(ARGV, first)) end
  count_waiting(record, waiting, cur, redis.call('HGET', record, 'status'))
  if deadline == '-' then redis.call('ZREM', inflight, id)
  elseif deadline ~= '' then redis.call('ZADD', inflight, deadline, id) end
  return {1, cur}
end
"""

# KEYS: record, plugin index, inflight, waiting, dedup ('' none), budget counter ('' none),
# the entry's charge ('' none). ARGV: id, ttl, now, index cap, dedup ttl, deadline, record
# key prefix, runs to charge, budget, budget ttl, field/value pairs... Returns {created,
# id, status of the existing record}; {-1, used, false} when the budget is spent.
CREATE = _WAITING + _CHARGE + """
if KEYS[6] ~= '' then
  local used = charge(KEYS[6], KEYS[7], ARGV[8], ARGV[10])
  if used > tonumber(ARGV[9]) then return {-1, used, false} end
end
if KEYS[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    return {0, existing, redis.call('HGET', ARGV[7] .. existing, 'status')}
  end
  redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[5])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 11))
count_waiting(KEYS[1], KEYS[4], nil, redis.call('HGET', KEYS[1], 'status'))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3] - ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[4]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return {1, ARGV[1], false}
"""

# KEYS: record, inflight, waiting. ARGV: allowed sources, id, deadline, field to increment
# (''), expected worker (''), field/value pairs (status first)...
TRANSITION = _WAITING + _TRANSITION + """
return transition(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 6)
"""

# KEYS: the plugin's slots, waiting per plugin, worker slots. ARGV: now, concurrency cap
# (0: none), invocation id, lease expiry, share, plugin, beat TTL.
ACQUIRE = _SLOT + """
return acquire_slot(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
                    ARGV[6], ARGV[7])
"""

# A delivery takes its run: the record as it was, and, when its status is one of the
# claimable ones and a slot is granted, the run marked running with the attempt counted.
# KEYS: record, inflight, waiting, the plugin's slots, worker slots. ARGV: claimable
# states, deadline, then acquire_slot's (now, cap, id, lease expiry, share, plugin, beat
# TTL), field/value pairs (status first)... Returns {grant ('' when not claimable), the
# record's hash}.
CLAIM = _WAITING + _SLOT + _TRANSITION + """
local before = redis.call('HGETALL', KEYS[1])
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur or not string.find(ARGV[1], '|' .. cur .. '|', 1, true) then
  return {'', before}
end
local grant = acquire_slot(KEYS[4], KEYS[3], KEYS[5], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
                           ARGV[7], ARGV[8], ARGV[9])
if grant ~= 'granted' then return {grant, before} end
transition(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[5], ARGV[2], 'attempts', '', 10)
return {grant, before}
"""

# KEYS: record, inflight, stream, waiting, the run's slot set ('' none). ARGV: allowed
# sources, id, maxlen, n events, events..., field/value pairs... One script: the events
# and the terminal record land together or not at all; the delivery's worker slot (if
# any) is freed in the same step, whatever it finds.
FINISH = _WAITING + """
if KEYS[5] ~= '' then redis.call('ZREM', KEYS[5], ARGV[2]) end
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
