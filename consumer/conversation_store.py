"""Each conversation's stored turns in Redis, and each new turn's history window, updated atomically by one
Lua script.

Layout, per conversation (``core.records.conversation_scope``: tenant and conversation id):
``<prefix>:win:{<scope>}``, a sorted set scored by turn, each member a small JSON object (turn, the speaker's
number, speaker, text, the parent message id of a reply, the message id); ``<prefix>:ids:{<scope>}``, a hash
from message id to its turn (duplicate ids, redeliveries and reply chains without scanning the turns); and
``<prefix>:spk:{<scope>}``, a hash from speaker to its number in the conversation (``Speaker_<k>`` in every
prompt, by first appearance: the prompt builder keeps a conversation's speakers apart the same way on every
turn, see ``scoring.prompts``), and under the empty field (no speaker is blank: ``consumer.validation``) the
next number to give. The braces are a Redis Cluster hash tag: every key of a conversation lands in one slot.
A Redis that lost a conversation's state numbers its speakers afresh; its events say ``window_degraded`` (the
turns before are missing too). A Redis that lost the speaker hash alone (evicted under ``maxmemory``) rebuilds
it from the numbers its stored turns carry, so nobody in the window is renumbered.

**Bounded speaker numbers.** The turns and their ids are trimmed to ``retain`` turns; the speaker hash is
bounded too, or a social-media thread with thousands of commenters would grow it for as long as it stays
active. It keeps up to ``max_speakers`` numbers (``conversation.max_speakers``, never fewer than ``retain``):
an ordinary conversation's speakers keep their numbers for the conversation's life, including one who has been
silent for longer than the retained turns. When the hash outgrows the bound, every speaker who has no retained
turn is forgotten at once (one pass over the retained turns, so the cost is shared by the next
``max_speakers - retain`` new speakers, not paid per message); one who speaks again later gets a new number.
The numbers of the speakers of the retained turns never change, and the counter never goes back, so a new
speaker never takes a number that a retained turn carries: every window (cut from the retained turns) keeps
its labels and its cached prefix, and a window never shows two people under one label.

The script, in one atomic step:

1. numbers a message that carries no turn: the turn it already has if its id is stored (a redelivery keeps
   its turn), else one past the conversation's newest stored turn (arrival order);
2. numbers the speaker if the conversation has not seen it, and appends the turn unless that turn is already stored (a redelivered message does not grow the
   window twice, and a conflicting duplicate keeps the first version), or unless the same message id
   is already stored at another turn (a duplicate message id: reported, nothing stored);
3. reads the turns the window of this turn is cut from (``size``: the window's span, ``window.size +
   window.hop - 1``; the prompt builder cuts the window): for a reply (``reply_to``), its chain of
   ancestors, parent first, up to ``size`` turns, and the reply's depth in its thread (never a sibling
   branch; a parent that is not stored ends the chain and the window is reported incomplete); otherwise
   the last ``size`` turns with turn <= this one, so a replayed old turn still sees its own past and never
   a future turn;
4. trims the turns and ids to the newest ``retain`` turns, forgets the speakers absent from them once the
   speaker hash holds more than ``max_speakers`` numbers (above), and refreshes the TTLs.

Many messages go to Redis in one pipelined round-trip (``append_many``, via :func:`consumer.redis_scripts.run_scripts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import redis

from consumer.redis_scripts import run_scripts
from core.settings import ConversationSettings, Settings
from scoring.prompts import Turn, WindowShape

_APPEND_LUA = """
local zkey, hkey, skey = KEYS[1], KEYS[2], KEYS[3]
local turn = tonumber(ARGV[1])  -- nil: the message carries no turn, number it by arrival
local size, retain, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local id, parent, speaker = ARGV[6], ARGV[7], ARGV[8]
local max_speakers = tonumber(ARGV[9])
local NEXT = ''  -- the speaker hash's field holding the next number (no speaker is blank)

local function restore_speakers()
  -- The hash is gone while turns remain (evicted alone under maxmemory): the stored turns carry their
  -- speakers' numbers; the next number is past all of them.
  local top = -1
  for _, m in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
    local d = cjson.decode(m)
    if d.k then
      redis.call('HSET', skey, d.s, d.k)
      if d.k > top then top = d.k end
    end
  end
  redis.call('HSET', skey, NEXT, top + 1)
  return top + 1
end

local function speaker_number()
  local k = redis.call('HGET', skey, speaker)
  if k then return k end
  local n = tonumber(redis.call('HGET', skey, NEXT))
  if n == nil then
    n = redis.call('HLEN', skey)  -- a hash written before the counter: numbers 0..n-1, none forgotten
    if n == 0 and redis.call('EXISTS', zkey) == 1 then
      n = restore_speakers()
      k = redis.call('HGET', skey, speaker)
      if k then return k end
    end
  end
  redis.call('HSET', skey, speaker, n, NEXT, n + 1)
  return n
end

local function delete_fields(key, fields)  -- in chunks: unpack() returns at most ~8,000 values
  for i = 1, #fields, 1000 do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + 999, #fields)))
  end
end

local function forget_absent_speakers()
  -- Every speaker without a retained turn; the retained turns' speakers keep their numbers.
  if redis.call('HEXISTS', skey, NEXT) == 0 then
    redis.call('HSET', skey, NEXT, redis.call('HLEN', skey))  -- before the counter: numbers 0..HLEN-1
  end
  local present = {[NEXT] = true}
  for _, m in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do present[cjson.decode(m).s] = true end
  local absent = {}
  for _, s in ipairs(redis.call('HKEYS', skey)) do
    if not present[s] then absent[#absent + 1] = s end
  end
  delete_fields(skey, absent)
end

local stored_at = tonumber(redis.call('HGET', hkey, id))  -- nil when the id is not stored
if turn == nil then
  if stored_at ~= nil then
    turn = stored_at  -- a redelivered message keeps the turn it was given
  else
    local newest = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
    if #newest > 0 then turn = tonumber(newest[2]) + 1 else turn = 0 end
  end
end
if stored_at ~= nil and stored_at ~= turn then
  return {0, {}, string.format('%d', stored_at), turn, 0, -1}
end
local added, member = 0, nil
local at = redis.call('ZRANGEBYSCORE', zkey, turn, turn, 'LIMIT', 0, 1)
if #at == 0 then
  local k = speaker_number()  -- the speaker's number in this conversation, by first appearance
  member = '{"t":' .. string.format('%d', turn) .. ',"k":' .. string.format('%d', k) .. ',' .. ARGV[2]
  redis.call('ZADD', zkey, turn, member)
  redis.call('HSET', hkey, id, turn)
  added = 1
else
  member = at[1]  -- this turn's stored message: this one again, or a conflicting one
end
local window, incomplete, depth = nil, 0, -1
if parent == '' then
  window = redis.call('ZREVRANGEBYSCORE', zkey, turn, '-inf', 'LIMIT', 0, size)
else
  -- the chain of ancestors, parent first: `size` of them kept, all counted (the reply's depth in its thread)
  window = {member}
  depth = 0
  local p = parent
  while p ~= nil and depth < retain do
    local at_turn = redis.call('HGET', hkey, p)
    local m = at_turn and redis.call('ZRANGEBYSCORE', zkey, at_turn, at_turn, 'LIMIT', 0, 1)[1]
    if not m then
      incomplete = 1
      break
    end
    depth = depth + 1
    if #window < size then window[#window + 1] = m end
    p = cjson.decode(m).p
  end
  if incomplete == 1 then depth = -1 end
end
local gone = redis.call('ZRANGE', zkey, 0, -(retain + 1))
if #gone > 0 then
  for _, g in ipairs(gone) do redis.call('HDEL', hkey, cjson.decode(g).m) end
  redis.call('ZREMRANGEBYRANK', zkey, 0, -(retain + 1))
end
if redis.call('HLEN', skey) > max_speakers + 1 then forget_absent_speakers() end  -- + 1: the counter field
redis.call('EXPIRE', zkey, ttl)
redis.call('EXPIRE', hkey, ttl)
redis.call('EXPIRE', skey, ttl)
return {added, window, false, turn, incomplete, depth}
"""


@dataclass(frozen=True)
class StoredTurn:
    """A stored turn: what the prompt needs plus the message id, for audits."""

    turn: int | None  # None until the store numbers it (a message without a turn)
    speaker: str
    text: str
    message_id: str
    reply_to: str | None = None  # the parent's message id, for a reply in a thread
    speaker_id: int | None = None  # the speaker's number in the conversation (None: stored by an older version)

    def as_prompt_turn(self) -> Turn:
        """The turn at its place in the conversation (``position``: its turn)."""
        # Built once per stored turn: decoded turns are shared by every window that holds them (the store's
        # decode cache).
        prompt_turn = self.__dict__.get("_prompt_turn")
        if prompt_turn is None:
            prompt_turn = Turn(self.speaker, self.text, self.speaker_id, self.turn)
            object.__setattr__(self, "_prompt_turn", prompt_turn)
        return prompt_turn


@dataclass(frozen=True)
class TurnUpdate:
    """The result of appending one turn: whether it was new, and its window oldest-first (target last).

    ``duplicate_of_turn`` is set when the message id is already stored at another turn of the
    conversation; then nothing was stored and ``window`` is empty.
    """

    added: bool
    window: tuple[StoredTurn, ...]
    duplicate_of_turn: int | None = None
    turn: int | None = None  # the message's turn: its own, or the one the store gave it
    thread_incomplete: bool = False  # a reply whose chain of ancestors reached a parent not stored
    depth: int | None = None  # a reply's depth in its thread (its top comment: 0), when its chain is complete

    def prompt_turns(self) -> list[Turn]:
        """The window's turns for the prompt builder, each at its position: its turn, or for a reply in a complete
        thread its depth (the builder's hops follow depth there); a broken thread's turns have none."""
        turns = [t.as_prompt_turn() for t in self.window]
        if self.window and self.window[-1].reply_to is not None:
            last = len(turns) - 1
            turns = [Turn(t.speaker, t.text, t.speaker_id, None if self.depth is None else self.depth - (last - i))
                     for i, t in enumerate(turns)]
        return turns

    def degraded(self, turn: int, shape: WindowShape, *, reply: bool = False) -> bool:
        """True if the window lacks turns it should hold. A reply's: an ancestor was not found. Any other's:
        the stored turns do not hold every turn from the window's first (``shape.first(turn)``) to ``turn``."""
        if reply:
            return self.thread_incomplete
        first = shape.first(turn)
        window = [t for t in self.window if t.turn is not None and t.turn >= first]
        if len(window) != turn - first + 1:
            return True
        # A window's turns strictly increase (one member per turn, by the script): with the right length,
        # it is exactly first..turn when both ends are.
        return window[0].turn != first or window[-1].turn != turn


#: Defaults of ``conversation.max_speakers`` and ``conversation.decode_cache_turns`` (core.settings), for a store
#: built without settings (tests, benchmarks).
MAX_SPEAKERS = ConversationSettings.model_fields["max_speakers"].default
DECODE_CACHE_TURNS = ConversationSettings.model_fields["decode_cache_turns"].default


class ConversationStore:
    def __init__(self, client: redis.Redis, *, prefix: str, size: int, retain: int, ttl_s: int,
                 max_speakers: int = MAX_SPEAKERS, decode_cache_turns: int = DECODE_CACHE_TURNS) -> None:
        """``size``: the most turns a window is cut from (``WindowShape.span``); ``max_speakers``: speaker numbers
        a conversation keeps before it forgets those without a retained turn (at least ``retain``, see the module
        docstring); ``decode_cache_turns``: decoded stored turns kept in this process (0: none)."""
        if retain < size:
            raise ValueError(f"retain ({retain}) must be >= the window's span ({size})")
        self.client = client
        self.prefix = prefix
        self.size = size
        self.retain = retain
        self.ttl_s = ttl_s
        # Below `retain`, a hash holding only the retained turns' speakers would be scanned on every new one.
        self.max_speakers = max(max_speakers, retain)
        self._append = client.register_script(_APPEND_LUA)
        # Per store, bounded by the setting: consecutive windows of a conversation share all but one turn, so a
        # batch's replies repeat members ~size times; StoredTurn is frozen, the same bytes decode alike.
        self._decode = lru_cache(maxsize=decode_cache_turns)(decode_member)

    @classmethod
    def configured(cls, client: redis.Redis, settings: Settings) -> "ConversationStore":
        """The store as ``settings`` say (``window`` and ``conversation`` sections, ``redis.key_prefix``)."""
        c = settings.conversation
        return cls(client, prefix=settings.redis.key_prefix, size=settings.window.span, retain=c.retain_turns,
                   ttl_s=c.ttl_s, max_speakers=c.max_speakers, decode_cache_turns=c.decode_cache_turns)

    def key(self, conversation_id: str) -> str:
        return f"{self.prefix}:win:{{{conversation_id}}}"

    def ids_key(self, conversation_id: str) -> str:
        return f"{self.prefix}:ids:{{{conversation_id}}}"

    def speakers_key(self, conversation_id: str) -> str:
        return f"{self.prefix}:spk:{{{conversation_id}}}"

    def append_many(self, turns: Sequence[tuple[str, StoredTurn]]) -> list[TurnUpdate]:
        """Append ``(conversation_id, turn)`` pairs in order, in one pipelined round-trip."""
        if not turns:
            return []
        calls = []
        for conversation_id, t in turns:
            # The member without its turn: the script prefixes '{"t":<turn>,' (it may number the turn itself).
            keys = [self.key(conversation_id), self.ids_key(conversation_id), self.speakers_key(conversation_id)]
            calls.append((self._append, keys, ["" if t.turn is None else t.turn, member_rest(t), self.size,
                                               self.retain, self.ttl_s, t.message_id, t.reply_to or "", t.speaker,
                                               self.max_speakers]))
        return [self._parse(r) for r in run_scripts(self.client, calls)]

    def get(self, conversation_id: str) -> list[StoredTurn]:
        """All retained turns of a conversation, oldest first."""
        return [self._decode(m) for m in self.client.zrange(self.key(conversation_id), 0, -1)]

    def _parse(self, reply: list) -> TurnUpdate:
        added, members = reply[0], reply[1]
        duplicate = reply[2] if len(reply) > 2 else None  # Lua false arrives as None
        return TurnUpdate(
            bool(added), tuple(self._decode(m) for m in reversed(members)),
            int(float(duplicate)) if duplicate is not None else None,
            int(reply[3]) if len(reply) > 3 else None,
            bool(reply[4]) if len(reply) > 4 else False,
            int(reply[5]) if len(reply) > 5 and int(reply[5]) >= 0 else None,
        )


def member_rest(t: StoredTurn) -> str:
    """A stored member without its turn and speaker number: the script prefixes ``{"t":<turn>,"k":<number>,`` (it
    may number the turn itself, and it numbers the speaker)."""
    fields = {"s": t.speaker, "x": t.text, **({"p": t.reply_to} if t.reply_to else {}), "m": t.message_id}
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))[1:]


def decode_member(member: bytes | str) -> StoredTurn:
    """A stored member as the turn it holds (each store caches these, see ``ConversationStore._decode``)."""
    d = json.loads(member)
    return StoredTurn(turn=int(d["t"]), speaker=d["s"], text=d["x"], message_id=d["m"], reply_to=d.get("p"),
                      speaker_id=d.get("k"))
