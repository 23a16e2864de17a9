-- A worker's beat, on Redis's clock: its slot count with the time it was seen (the fair
-- share counts the live workers' slots).
local k = {workers = KEYS[1]}
-- {name, slots}
local a = cjson.decode(ARGV[1])
redis.call('HSET', k.workers, a.name, a.slots .. ' ' .. string.format('%.3f', now()))
return 1
