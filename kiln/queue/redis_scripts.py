"""The Lua scripts behind :class:`~kiln.queue.redis.RedisBroker`: every state change is one script,
so it is atomic however many API nodes and workers share the server.

Keys (``P`` is the broker's prefix, ``ARGV[1]`` in every script):

- ``P job:<id>``: a hash per job (status, priority, payload, times, step, output, result, error,
  attempts, worker_id, lease, cancel flag; ``stream``/``entry`` name its stream entry while running).
- ``P queued:<priority>``: a sorted set of the queued jobs, scored by creation time.
- ``P stream:<priority>``: a stream with the consumer group ``workers``; an entry per *running*
  job, pending in its worker's list until the result is stored (XACK, then XDEL).
- ``P running``: a set of running job ids; ``P finished``: a sorted set by finish time.
- ``P idem:<key_id>:<idempotency key>``: a hash (job, request hash, created) expiring with its lifetime.
- ``P idle``: a sorted set of idle workers scored by when that stops being true (ms, Redis clock): a
  claim that finds nothing for its worker adds it, a claim that takes a job removes it.
- ``P holds:<worker>``: a set of what the worker holds (``m:<family/model>`` for each loaded model and
  its aliases, ``l:<sha256>`` for each cached LoRA), rewritten at each of its claims.
- ``P wake:<worker>``: a one-item list an idle worker blocks on (``BLPOP``); a new or handed-back job
  pushes to the list of the idle worker that fits it best, which claims it at once instead of at its
  next poll.

Routing: a job's hash has ``needs`` (``m:<family/model>`` and ``l:<sha256>`` of its LoRAs; see
:func:`kiln.worker.payload.needs_of`). A worker's *fit* for a job is 2 when it holds the model and
every LoRA, 1 the model only, 0 neither. A claim takes the first job in claim order (among the first
``depth``) for which no *idle* worker fits better than this one: a job goes to a free worker that
already holds its model, and to any worker when none that holds it is free. Idle workers renew their
place at every claim (at least every poll interval), so a worker that died idle stops counting
after ``idle_ms``.

Every change is also announced: ``PUBLISH P changes <job id>`` (``*`` when the queue's order moved),
which :class:`~kiln.queue.changes.RedisChangeListener` forwards to the SSE streams of each API node.

Scripts answer a tag first (``ok``, ``lease_lost``, ``unknown``, ...) that Python maps to errors.
Times travel as the strings Python formatted, so no digits are lost to Lua's number formatting.
"""

from __future__ import annotations

COMMON = """
local P = ARGV[1]
local GROUP = 'workers'
local PRIORITIES = {'high', 'normal', 'low'}
local function jkey(id) return P .. 'job:' .. id end
local function changed(id) redis.call('PUBLISH', P .. 'changes', id) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function words(text)
  local out = {}
  for w in string.gmatch(text or '', '%S+') do table.insert(out, w) end
  return out
end
local function fit(holds, needs)  -- holds: a set; needs: a list, the model first
  if #needs == 0 then return 2 end
  if not holds[needs[1]] then return 0 end
  for k = 2, #needs do if not holds[needs[k]] then return 1 end end
  return 2
end
local function idle_holdings(except)  -- the holdings (sets) of the workers idle now, but `except`
  local out = {}
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', P .. 'idle', now_ms(), '+inf')) do
    if w ~= except then
      local set = {}
      for _, item in ipairs(redis.call('SMEMBERS', P .. 'holds:' .. w)) do set[item] = true end
      table.insert(out, {w, set})
    end
  end
  return out
end
local function wake_for(id)  -- job `id` can be claimed: the idle worker that fits it best looks now
  local needs, best, best_fit = words(redis.call('HGET', jkey(id), 'needs')), nil, -1
  for _, o in ipairs(idle_holdings('')) do
    local f = fit(o[2], needs)
    if f > best_fit then best, best_fit = o[1], f end
  end
  if best then  -- one worker, not all: the others would only find it taken (if it died while idle,
    local k = P .. 'wake:' .. best  -- the others take the job once its idle entry runs out)
    redis.call('RPUSH', k, '1')
    redis.call('LTRIM', k, -1, -1)
    redis.call('PEXPIRE', k, 60000)
  end
end
local function drop_entry(job)  -- the result is stored: acknowledge and delete the job's entry
  local where = redis.call('HMGET', job, 'stream', 'entry')
  if where[1] and where[2] then
    redis.call('XACK', where[1], GROUP, where[2])
    redis.call('XDEL', where[1], where[2])
  end
  redis.call('HDEL', job, 'stream', 'entry', 'lease')
end
"""

# ARGV: P, id, priority, created, idem key name ('' none), request hash marker, max_depth ('' none),
# idempotency ttl (s), then the job hash's field/value pairs.
SUBMIT = COMMON + """
local id, prio, created, idem, rhash = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local max_depth, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
if idem ~= '' then
  local seen = redis.call('HMGET', idem, 'job', 'hash', 'created')
  if seen[1] and tonumber(created) - tonumber(seen[3]) < ttl then
    if seen[2] ~= rhash then return {'conflict', seen[1]} end
    return {'existing', seen[1], redis.call('HGETALL', jkey(seen[1]))}
  end
end
if max_depth then
  local queued = 0
  for _, p in ipairs(PRIORITIES) do queued = queued + redis.call('ZCARD', P .. 'queued:' .. p) end
  if queued >= max_depth then return {'full', tostring(queued)} end
end
redis.call('HSET', jkey(id), unpack(ARGV, 9))
redis.call('ZADD', P .. 'queued:' .. prio, created, id)
if idem ~= '' then
  redis.call('HSET', idem, 'job', id, 'hash', rhash, 'created', created)
  redis.call('EXPIRE', idem, math.ceil(ttl))
end
changed('*')
wake_for(id)
return {'created', id, redis.call('HGETALL', jkey(id))}
"""

# What CLAIM and CLAIM_LIKE share: the claim order, and starting a job on a worker.
TAKING = COMMON + """
local function claim_order(n, now, aging)  -- the first n queued jobs of each priority, in claim order
  local order = {}
  for i, p in ipairs(PRIORITIES) do
    local items = redis.call('ZRANGE', P .. 'queued:' .. p, 0, n - 1, 'WITHSCORES')
    for j = 1, #items, 2 do
      local created = tonumber(items[j + 1])
      local eff = math.max(0, (i - 1) - math.floor(math.max(0, now - created) / aging))
      table.insert(order, {eff, created, items[j], p})
    end
  end
  table.sort(order, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[3] < b[3]
  end)
  return order
end
local function mark_running(id, worker, lease, now_s)
  local job = jkey(id)
  redis.call('ZREM', P .. 'idle', worker)
  redis.call('HSET', job, 'status', 'running', 'started', now_s, 'worker_id', worker, 'lease', lease,
             'step', '0', 'total_steps', '0')
  redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('SADD', P .. 'running', id)
  changed(id)
  changed('*')
end
local function start_queued(id, p, worker, lease, now_s)  -- a queued job becomes a pending stream entry
  local stream = P .. 'stream:' .. p
  redis.call('ZREM', P .. 'queued:' .. p, id)
  if redis.call('EXISTS', stream) == 0 then redis.call('XGROUP', 'CREATE', stream, GROUP, '$', 'MKSTREAM') end
  local entry = redis.call('XADD', stream, '*', 'job', id)
  redis.call('XREADGROUP', 'GROUP', GROUP, worker, 'COUNT', 1, 'STREAMS', stream, '>')  -- pending: the lease
  redis.call('HSET', jkey(id), 'stream', stream, 'entry', entry)
  mark_running(id, worker, lease, now_s)
end
"""

# ARGV: P, worker, now, aging (s), lease idle limit (ms), max_attempts, new lease, worker-lost message
# (with "{attempts}"), what the worker holds (space-separated), how long it counts as idle without
# claiming again (ms), how deep to look for a job it fits.
# Returns {claimed id or '', {ids failed as worker_lost}, the claimed job's hash}.
CLAIM = TAKING + """
local worker, now_s, aging, idle_ms = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now, max_attempts, lease, lost_message = tonumber(now_s), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local held, idle_for, depth = words(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local lost = {}

local hkey = P .. 'holds:' .. worker
redis.call('DEL', hkey)
if #held > 0 then
  redis.call('SADD', hkey, unpack(held))
  redis.call('PEXPIRE', hkey, idle_for * 2)
end
local holds = {}
for _, item in ipairs(held) do holds[item] = true end

local function run_here(id, job)
  mark_running(id, worker, lease, now_s)
  return {id, lost, redis.call('HGETALL', job)}
end

-- 1. a running job whose worker stopped heartbeating: its entry idled past the lease. XPENDING's IDLE
-- filter finds it in one call however many jobs are running; XAUTOCLAIM from there takes it over.
for _, p in ipairs(PRIORITIES) do
  local stream = P .. 'stream:' .. p
  if redis.call('EXISTS', stream) == 1 then
    while true do
      local stale = redis.call('XPENDING', stream, GROUP, 'IDLE', idle_ms, '-', '+', 1)
      if #stale == 0 then break end
      local entry = stale[1][1]
      local e = redis.call('XAUTOCLAIM', stream, GROUP, worker, idle_ms, entry, 'COUNT', 1)[2][1]
      local id = e and e[2] and e[2][2]
      local st = id and redis.call('HMGET', jkey(id), 'status', 'entry', 'attempts') or {}
      local job = id and jkey(id)
      if st[1] ~= 'running' or st[2] ~= entry then  -- not this job's live entry any more
        redis.call('XACK', stream, GROUP, entry)
        redis.call('XDEL', stream, entry)
      elseif tonumber(st[3]) >= max_attempts then
        drop_entry(job)
        redis.call('HSET', job, 'status', 'failed', 'finished', now_s, 'error_code', 'worker_lost',
                   'error_message', (string.gsub(lost_message, '{attempts}', st[3])))
        redis.call('SREM', P .. 'running', id)
        redis.call('ZADD', P .. 'finished', now_s, id)
        changed(id)
        table.insert(lost, id)
      else
        return run_here(id, job)  -- the entry is this worker's now, idle time reset
      end
    end
  end
end

-- 2. the first queued job in claim order (best effective rank, then oldest, then id) that no idle
-- worker fits better than this one.
local others = nil
local function mine_to_take(job_id)
  local needs = words(redis.call('HGET', jkey(job_id), 'needs'))
  local mine = fit(holds, needs)
  if mine == 2 then return true end
  others = others or idle_holdings(worker)
  for _, o in ipairs(others) do
    if fit(o[2], needs) > mine then return false end
  end
  return true
end
local chosen = nil
local order = claim_order(1, now, aging)  -- the usual case: the head is this worker's to take
if order[1] and mine_to_take(order[1][3]) then
  chosen = order[1]
elseif order[1] then
  order = claim_order(depth, now, aging)
  for k = 2, math.min(#order, depth) do
    if mine_to_take(order[k][3]) then chosen = order[k] break end
  end
end
if not chosen then
  local t = now_ms()
  redis.call('ZREMRANGEBYSCORE', P .. 'idle', '-inf', t)  -- workers gone quiet (dead, or busy elsewhere)
  redis.call('ZADD', P .. 'idle', t + idle_for, worker)
  return {'', lost, {}}
end
start_queued(chosen[3], chosen[4], worker, lease, now_s)
return {chosen[3], lost, redis.call('HGETALL', jkey(chosen[3]))}
"""

# ARGV: P, worker, now, aging (s), batch signature, how deep to look, then one new lease per job wanted.
# Queued jobs with that signature (kiln.engine.batch: they can share one pipeline call), in claim order
# among the first `depth`, now running on this worker (the one that claimed their first). Returns
# their hashes.
CLAIM_LIKE = TAKING + """
local worker, now_s, aging, batch, depth = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local leases, taken = {unpack(ARGV, 7)}, {}
for _, c in ipairs(claim_order(depth, tonumber(now_s), aging)) do
  if #taken >= #leases then break end
  if redis.call('HGET', jkey(c[3]), 'batch') == batch then
    start_queued(c[3], c[4], worker, leases[#taken + 1], now_s)
    table.insert(taken, redis.call('HGETALL', jkey(c[3])))
  end
end
return taken
"""

# ARGV: P, id, lease ('' none), step ('' none), total_steps. Progress and heartbeat in one:
# with a lease, the job's entry is claimed again by its own worker, which resets its idle time.
TOUCH = COMMON + """
local job = jkey(ARGV[2])
local st = redis.call('HMGET', job, 'status', 'lease', 'stream', 'entry', 'worker_id', 'cancel_requested')
if ARGV[3] ~= '' then
  if st[1] ~= 'running' or st[2] ~= ARGV[3] then return {'lease_lost', st[1] or 'unknown'} end
  redis.call('XCLAIM', st[3], GROUP, st[5], 0, st[4], 'JUSTID')
end
if ARGV[4] ~= '' and st[1] == 'running' then
  redis.call('HSET', job, 'step', ARGV[4], 'total_steps', ARGV[5])
  changed(ARGV[2])
end
return {'ok', st[6] or '0'}
"""

# ARGV: P, id, lease ('' none), new status (complete, failed, cancelled or queued), now, then
# field/value pairs to set. Only a running job moves; the result is stored before the entry is acked.
FINISH = COMMON + """
local id, lease, new, now_s = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local job = jkey(id)
local st = redis.call('HMGET', job, 'status', 'lease', 'priority', 'created')
if not st[1] then return {'unknown', ''} end
if lease ~= '' and (st[1] ~= 'running' or st[2] ~= lease) then return {'lease_lost', st[1]} end
if st[1] ~= 'running' then return {'invalid', st[1]} end
if #ARGV > 5 then redis.call('HSET', job, unpack(ARGV, 6)) end
drop_entry(job)
redis.call('SREM', P .. 'running', id)
if new == 'queued' then
  redis.call('HDEL', job, 'started', 'worker_id')
  redis.call('HSET', job, 'status', 'queued', 'step', '0', 'total_steps', '0')
  redis.call('ZADD', P .. 'queued:' .. st[3], st[4], id)
  changed('*')
  wake_for(id)
else
  redis.call('HSET', job, 'status', new, 'finished', now_s)
  redis.call('ZADD', P .. 'finished', now_s, id)
end
changed(id)
return {'ok', redis.call('HGETALL', job)}
"""

# ARGV: P, id, now. A queued job is cancelled now; a running one is asked to stop.
CANCEL = COMMON + """
local id, now_s = ARGV[2], ARGV[3]
local job = jkey(id)
local st = redis.call('HMGET', job, 'status', 'priority')
if not st[1] then return {} end
if st[1] == 'queued' then
  redis.call('ZREM', P .. 'queued:' .. st[2], id)
  redis.call('HSET', job, 'status', 'cancelled', 'finished', now_s)
  redis.call('ZADD', P .. 'finished', now_s, id)
  changed('*')
elseif st[1] == 'running' then
  redis.call('HSET', job, 'cancel_requested', '1')
end
changed(id)
return redis.call('HGETALL', job)
"""
