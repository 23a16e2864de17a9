-- A worker slot on its own (a takeover: the run is already running elsewhere).
local k = {slots = KEYS[1], waiting = KEYS[2], workers = KEYS[3]}
return acquire_slot(k.slots, k.waiting, k.workers, cjson.decode(ARGV[1]))
