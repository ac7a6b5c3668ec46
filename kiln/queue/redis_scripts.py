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

Scripts answer a tag first (``ok``, ``lease_lost``, ``unknown``, ...) that Python maps to errors.
Times travel as the strings Python formatted, so no digits are lost to Lua's number formatting.
"""

from __future__ import annotations

COMMON = """
local P = ARGV[1]
local GROUP = 'workers'
local PRIORITIES = {'high', 'normal', 'low'}
local function jkey(id) return P .. 'job:' .. id end
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
    return {'existing', seen[1]}
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
return {'created', id}
"""

# ARGV: P, worker, now, aging (s), lease idle limit (ms), max_attempts, new lease, worker-lost message
# (with "{attempts}"). Returns {claimed id or '', {ids failed as worker_lost}, the claimed job's hash}.
CLAIM = COMMON + """
local worker, now_s, aging, idle_ms = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now, max_attempts, lease, lost_message = tonumber(now_s), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local lost = {}

local function run_here(id, job)
  redis.call('HSET', job, 'status', 'running', 'started', now_s, 'worker_id', worker, 'lease', lease,
             'step', '0', 'total_steps', '0')
  redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('SADD', P .. 'running', id)
  return {id, lost, redis.call('HGETALL', job)}
end

-- 1. a running job whose worker stopped heartbeating: its entry idled past the lease
for _, p in ipairs(PRIORITIES) do
  local stream = P .. 'stream:' .. p
  if redis.call('EXISTS', stream) == 1 then
    local cursor = '0-0'
    repeat
      local got = redis.call('XAUTOCLAIM', stream, GROUP, worker, idle_ms, cursor, 'COUNT', 1)
      cursor = got[1]
      for _, e in ipairs(got[2]) do
        local entry, id = e[1], e[2] and e[2][2]
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
          table.insert(lost, id)
        else
          return run_here(id, job)  -- the entry is this worker's now, idle time reset
        end
      end
    until cursor == '0-0'
  end
end

-- 2. the first queued job in claim order: best effective rank, then oldest, then id
local best, best_p
for i, p in ipairs(PRIORITIES) do
  local head = redis.call('ZRANGE', P .. 'queued:' .. p, 0, 0, 'WITHSCORES')
  if head[1] then
    local created = tonumber(head[2])
    local eff = math.max(0, (i - 1) - math.floor(math.max(0, now - created) / aging))
    if not best or eff < best[1] or (eff == best[1] and (created < best[2]
        or (created == best[2] and head[1] < best[3]))) then
      best, best_p = {eff, created, head[1]}, p
    end
  end
end
if not best then return {'', lost, {}} end
local id, stream = best[3], P .. 'stream:' .. best_p
redis.call('ZREM', P .. 'queued:' .. best_p, id)
if redis.call('EXISTS', stream) == 0 then redis.call('XGROUP', 'CREATE', stream, GROUP, '$', 'MKSTREAM') end
local entry = redis.call('XADD', stream, '*', 'job', id)
redis.call('XREADGROUP', 'GROUP', GROUP, worker, 'COUNT', 1, 'STREAMS', stream, '>')  -- pending: the lease
redis.call('HSET', jkey(id), 'stream', stream, 'entry', entry)
return run_here(id, jkey(id))
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
else
  redis.call('HSET', job, 'status', new, 'finished', now_s)
  redis.call('ZADD', P .. 'finished', now_s, id)
end
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
elseif st[1] == 'running' then
  redis.call('HSET', job, 'cancel_requested', '1')
end
return redis.call('HGETALL', job)
"""
