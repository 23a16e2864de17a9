-- One timer tick, exactly once, whichever manager gets here first: the tick's scheduled
-- time is recorded as the timer's last and its event (and a catch-up's) added to the
-- stream in one step, so two managers, or one restarted mid-tick, never fire a time twice.
-- KEYS: the fired hash (titan:timers:fired), the since hash, the event stream.
-- ARGV[1]: {"timer": "plugin:key", "due": epoch s, "prev": the tick before it,
--           "since": epoch s (when the timer is first seen), "late": due was missed,
--           "catch_up": "last"|"none", "event": JSON, "prev_event": JSON, "maxlen": n}
-- Returns {outcome, last, caught}: outcome "fired", "skipped" (missed, catch_up none) or
-- "seen" (handled already, or scheduled before the timer was in service); last: the
-- timer's previous tick (-1: none); caught: 1 when a missed tick before `due` was fired
-- as the catch-up (catch_up last, `due` itself on time).
local fired_hash, since_hash, stream = KEYS[1], KEYS[2], KEYS[3]
local a = cjson.decode(ARGV[1])
redis.call('HSETNX', since_hash, a.timer, tostring(a.since))
local since = tonumber(redis.call('HGET', since_hash, a.timer))
local last = tonumber(redis.call('HGET', fired_hash, a.timer) or '-1')
if a.due <= last or a.due < since then
  return {'seen', tostring(last), 0}
end
redis.call('HSET', fired_hash, a.timer, tostring(a.due))
local caught = 0
if a.catch_up == 'last' and not a.late and a.prev > last and a.prev >= since then
  redis.call('XADD', stream, 'MAXLEN', '~', a.maxlen, '*', 'event', a.prev_event)
  caught = 1
end
if a.late and a.catch_up == 'none' then
  return {'skipped', tostring(last), caught}
end
redis.call('XADD', stream, 'MAXLEN', '~', a.maxlen, '*', 'event', a.event)
return {'fired', tostring(last), caught}
