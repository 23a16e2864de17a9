-- One status change of a record, checked against the transition table's sources.
local k = {record = KEYS[1], inflight = KEYS[2], waiting = KEYS[3]}
-- {id, sources, fields, due_in?, increment?, owner?}
local a = cjson.decode(ARGV[1])
return transition(k.record, k.inflight, k.waiting, a.id, a)
