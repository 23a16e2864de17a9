-- Functions shared by the record and slot scripts (prepended to each script at load:
-- manager/core/scripts.py). Every record field is stored as the JSON of its value.

-- Redis's own clock: slot leases and worker beats are judged by one clock, whatever the
-- clocks of the hosts that write them say.
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function status_of(record)
  local raw = redis.call('HGET', record, 'status')
  if not raw then return nil end
  return cjson.decode(raw)
end

local function set_of(list)
  local set = {}
  for _, item in ipairs(list) do set[item] = true end
  return set
end

local function hset_fields(record, fields)
  local flat = {}
  for name, value in pairs(fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  if #flat > 0 then redis.call('HSET', record, unpack(flat)) end
end

-- Runs waiting in the queue (status queued), counted per plugin in one hash as part of
-- every status change, so the count is exact: the fair share (acquire_slot) reads it to
-- know whether another plugin has a run waiting its turn. A throttled run is not counted:
-- it already had its turn and waits for a slot it may not take.
local function count_waiting(record, waiting, from, to)
  local before, after = from == 'queued', to == 'queued'
  if before == after then return end
  local plugin = cjson.decode(redis.call('HGET', record, 'plugin'))
  if redis.call('HINCRBY', waiting, plugin, after and 1 or -1) <= 0 then
    redis.call('HDEL', waiting, plugin)
  end
end

-- Each plugin's line: its runs sent and not yet running (pending, queued, throttled or
-- retrying), a sorted set by creation time whose key is the `waiting` hash's plus ':' and
-- the plugin's name. Its size is the plugin's queue depth, its first member the run that
-- has waited longest, and a new run's place in it decides the run's priority (fair
-- queueing: manager.bus.dispatch).
local IN_LINE = set_of({'pending', 'queued', 'throttled', 'retrying'})

local function line_of(waiting, plugin)
  return waiting .. ':' .. plugin
end

local function line_up(record, waiting, id, from, to)
  local before, after = IN_LINE[from] or false, IN_LINE[to] or false
  if before == after then return end
  local line = line_of(waiting, cjson.decode(redis.call('HGET', record, 'plugin')))
  if after then
    redis.call('ZADD', line, cjson.decode(redis.call('HGET', record, 'created_at')), id)
  else
    redis.call('ZREM', line, id)
  end
end

-- Every status change keeps both counts: the waiting hash and the plugin's line.
local function status_changed(record, waiting, id, from, to)
  count_waiting(record, waiting, from, to)
  line_up(record, waiting, id, from, to)
end

-- The fan-out budget: `runs` more for a correlation (its counter), counted once per
-- stream entry however often it is delivered (a second charge finds what the first
-- counted; no entry key: counted every time). Returns the runs counted so far.
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

-- Worker slots (manager.core.slots), leased on Redis's clock. Expired leases (a worker
-- that died holding one) are dropped first, so a crash never leaks a slot for long.
-- `ask`: {plugin, id, cap (0: none), lease_s, share, weight, beat_ttl}. Returns 'granted',
-- 'concurrency' (the manifest's cap) or 'share' (over the fair share while another
-- plugin waits).
local function acquire_slot(slots, waiting, workers, ask)
  local t = now()
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', t)
  if redis.call('ZSCORE', slots, ask.id) then return 'granted' end
  local held = redis.call('ZCARD', slots)
  if ask.cap > 0 and held >= ask.cap then return 'concurrency' end
  local counts = redis.call('HGETALL', waiting)
  local others = false
  for i = 1, #counts, 2 do
    if counts[i] ~= ask.plugin and tonumber(counts[i + 1]) > 0 then others = true; break end
  end
  if others then
    local total = 0
    local beats = redis.call('HGETALL', workers)
    for i = 1, #beats, 2 do
      local n, at = string.match(beats[i + 1], '^(%d+) ([%d.]+)$')
      if n and tonumber(at) > t - ask.beat_ttl then total = total + tonumber(n) end
    end
    -- a plugin's weight scales its share (weight 2: twice the slots of weight 1)
    if held >= math.max(1, math.floor(total * ask.share * ask.weight)) then
      return 'share'
    end
  end
  redis.call('ZADD', slots, t + ask.lease_s, ask.id)
  redis.call('EXPIRE', slots, math.ceil(ask.lease_s) + 60)
  return 'granted'
end

-- One transition: applied only from one of `change.sources` (a list of statuses);
-- `change.owner` makes it a compare-and-set on the record's worker; `change.due_in`
-- re-arms the sweeper's clock that many seconds from now on Redis's clock (absent: keep,
-- false: drop); `change.fields` (status
-- first among them) are the new field values, each as JSON. Returns {applied, status
-- found}.
local function transition(record, inflight, waiting, id, change)
  local found = status_of(record)
  if not found then return {0, false} end
  if not set_of(change.sources)[found] then return {0, found} end
  if change.owner and cjson.decode(redis.call('HGET', record, 'worker') or 'null')
      ~= change.owner then
    return {0, found}
  end
  if change.increment then redis.call('HINCRBY', record, change.increment, 1) end
  hset_fields(record, change.fields)
  if change.note then  -- the run is sent again: why, kept in its history (the last 20)
    local raw = redis.call('HGET', record, 'history')
    local history = raw and cjson.decode(raw) or {}
    if #history >= 20 then table.remove(history, 1) end
    history[#history + 1] = {at = now(), status = status_of(record), reason = change.note}
    redis.call('HSET', record, 'history', cjson.encode(history))
  end
  status_changed(record, waiting, id, found, status_of(record))
  if change.due_in == false then redis.call('ZREM', inflight, id)
  elseif change.due_in then redis.call('ZADD', inflight, now() + change.due_in, id) end
  return {1, found}
end
