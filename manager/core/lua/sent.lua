-- Which of the given runs have a task message in the broker: waiting in a queue list
-- (KEYS[1..n-1], every priority level) or delivered and not yet acknowledged (kombu's
-- `unacked` hash, KEYS[n]). A message is kombu's JSON; its headers carry the task id
-- (the run's id) as `"id": "..."`; its body is base64, so no event text can forge one.
-- One pass over the queue, however many runs are asked about.
local args = cjson.decode(ARGV[1])
local wanted = set_of(args.ids)
local found, out = {}, {}
local function look(message)
  for id in string.gmatch(message, '"id": "([^"]+)"') do
    if wanted[id] and not found[id] then
      found[id] = true
      out[#out + 1] = id
    end
  end
end
for i = 1, #KEYS - 1 do
  local size = redis.call('LLEN', KEYS[i])
  for first = 0, size - 1, 500 do
    for _, message in ipairs(redis.call('LRANGE', KEYS[i], first, first + 499)) do
      look(message)
    end
  end
end
for _, message in ipairs(redis.call('HVALS', KEYS[#KEYS])) do look(message) end
return out
