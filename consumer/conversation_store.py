"""Each conversation's stored turns in Redis, and each new turn's history window, updated atomically by one
Lua script.

Layout, per conversation (``core.records.conversation_scope``: tenant and conversation id):
``<prefix>:win:{<scope>}``, a sorted set scored by turn, each member a small JSON object (turn, the speaker's
number, speaker, text, the parent message id of a reply, the message id); ``<prefix>:ids:{<scope>}``, a hash
from message id to its turn (duplicate ids, redeliveries and reply chains without scanning the turns); and
``<prefix>:spk:{<scope>}``, a hash from speaker to its number in the conversation (``Speaker_<k>`` in every
prompt, by first appearance: the prompt builder keeps a conversation's speakers apart the same way on every
turn, see ``scoring.prompts``). The braces are a Redis Cluster hash tag: every key of a conversation lands in
one slot. A Redis that lost a conversation's state numbers its speakers afresh; its events say
``window_degraded`` (the turns before are missing too). The script, in one atomic step:

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
4. trims the turns and ids to the newest ``retain`` turns (the speaker numbers stay) and refreshes the TTLs.

Many messages go to Redis in one pipelined round-trip (``append_many``, via :func:`consumer.redis_scripts.run_scripts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import redis

from consumer.redis_scripts import run_scripts
from scoring.prompts import Turn, WindowShape

_APPEND_LUA = """
local zkey, hkey, skey = KEYS[1], KEYS[2], KEYS[3]
local turn = tonumber(ARGV[1])  -- nil: the message carries no turn, number it by arrival
local size, retain, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local id, parent, speaker = ARGV[6], ARGV[7], ARGV[8]
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
  local k = redis.call('HGET', skey, speaker)  -- the speaker's number in this conversation, by first appearance
  if not k then
    k = redis.call('HLEN', skey)
    redis.call('HSET', skey, speaker, k)
  end
  member = '{"t":' .. string.format('%d', turn) .. ',"k":' .. k .. ',' .. ARGV[2]
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
        # Built once per stored turn: decoded turns are shared by every window that holds them (see _decode).
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


class ConversationStore:
    def __init__(self, client: redis.Redis, *, prefix: str, size: int, retain: int, ttl_s: int) -> None:
        """``size``: the most turns a window is cut from (``WindowShape.span``)."""
        if retain < size:
            raise ValueError(f"retain ({retain}) must be >= the window's span ({size})")
        self.client = client
        self.prefix = prefix
        self.size = size
        self.retain = retain
        self.ttl_s = ttl_s
        self._append = client.register_script(_APPEND_LUA)

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
            fields = {"s": t.speaker, "x": t.text, **({"p": t.reply_to} if t.reply_to else {}), "m": t.message_id}
            rest = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))[1:]
            keys = [self.key(conversation_id), self.ids_key(conversation_id), self.speakers_key(conversation_id)]
            calls.append((self._append, keys, ["" if t.turn is None else t.turn, rest, self.size, self.retain,
                                               self.ttl_s, t.message_id, t.reply_to or "", t.speaker]))
        return [self._parse(r) for r in run_scripts(self.client, calls)]

    def get(self, conversation_id: str) -> list[StoredTurn]:
        """All retained turns of a conversation, oldest first."""
        return [_decode(m) for m in self.client.zrange(self.key(conversation_id), 0, -1)]

    @staticmethod
    def _parse(reply: list) -> TurnUpdate:
        added, members = reply[0], reply[1]
        duplicate = reply[2] if len(reply) > 2 else None  # Lua false arrives as None
        return TurnUpdate(
            bool(added), tuple(_decode(m) for m in reversed(members)),
            int(float(duplicate)) if duplicate is not None else None,
            int(reply[3]) if len(reply) > 3 else None,
            bool(reply[4]) if len(reply) > 4 else False,
            int(reply[5]) if len(reply) > 5 and int(reply[5]) >= 0 else None,
        )


@lru_cache(maxsize=65_536)
def _decode(member: bytes | str) -> StoredTurn:
    # Cached by the member's bytes: consecutive windows of a conversation share all but one turn, so a
    # batch's replies repeat members ~size times; StoredTurn is frozen, the same bytes decode alike.
    d = json.loads(member)
    return StoredTurn(turn=int(d["t"]), speaker=d["s"], text=d["x"], message_id=d["m"], reply_to=d.get("p"),
                      speaker_id=d.get("k"))
