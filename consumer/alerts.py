"""Alert rules evaluated in the stream, their state in Redis; alerts go to ``kafka.alerts_topic``.

Three rules (settings section ``alerts``):

- ``negative_streak``: ``streak_length`` consecutive turns of a conversation are negative. It fires
  once per streak, on the turn where the streak *first reaches* the length; longer streaks do not fire
  again, a new streak after a non-negative turn does.
- ``shift_to_anger``: a speaker's turn is anger and the same speaker's previous turn (within
  ``shift_lookback`` turns) was neutral or positive.
- ``tenant_negative_rate``: over a sliding window of ``tenant_window_s`` seconds (of the messages'
  ``sent_at``), more than ``tenant_threshold`` of a tenant's events are negative, with at least
  ``tenant_min_count`` events in the window. It fires on a negative event, then stays quiet for that
  tenant for ``tenant_cooldown_s``.

State (atomic Lua scripts, keys hash-tagged per conversation / tenant like the windows):

- ``<prefix>:alert:conv:{<conversation scope>}`` (``core.records.conversation_scope``: tenant and conversation): a sorted set of the conversation's recent turns, scored by
  turn, each member the turn's message id, speaker, label and probabilities. A redelivered turn replaces
  itself, so the rules are a pure function of the labels stored up to the turn being evaluated: a
  redelivery recomputes the same alert.
- ``<prefix>:alert:tenant:{t=<tenant>}:all`` / ``:neg`` (sorted sets of message ids by ``sent_at``),
  ``:ev`` (evidence of the negative ones) and ``:cool`` (the last alert's id and time, for the cooldown);
  ``t=`` keeps the hash tag non-empty for events without a tenant. A tenant's window is one key on one shard,
  so besides the time window it is bounded in events: past ``tenant_window_max_events`` the oldest events leave
  (``:neg`` and ``:ev`` with them), and a tenant that sends more than that per window is judged on the negative
  share of its most recent N events (with N = 10,000 a share's standard error is at most half a percentage point;
  the share weighs the end of the time window). The bound is a constant of the script (one per engine), hence one
  value for every tenant.

Redelivery: alert ids are deterministic (uuid5 of rule, tenant, conversation and the triggering message), and an
alert's id is recorded with ``SET NX`` once the broker acknowledged it (``mark_sent``); an alert whose
id is recorded is not sent again (``unsent``). Between the acks and the record a crash can send an
alert twice, with the same id: readers dedupe by ``alert_id`` (``core.readers.read_alerts``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import structlog

from consumer.redis_scripts import run_scripts
from core.records import Alert, AlertEvidence, ChatMessage, EmotionEvent, conversation_scope
from core.settings import AlertSettings

log = structlog.get_logger(__name__)

#: A message dated further in the future than this counts as sent now (a bad clock must not empty a window).
_MAX_FUTURE_S = 60.0

_CONV_LUA = """
local key = KEYS[1]
local turn = tonumber(ARGV[1])
local keep = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, turn, turn)
redis.call('ZADD', key, turn, ARGV[2])
redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
redis.call('EXPIRE', key, tonumber(ARGV[4]))
local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if ARGV[5] == '0' then return {newest[2], {}} end  -- no rule reads the stored turns of this event
local stored = redis.call('ZRANGEBYSCORE', key, turn - keep + 1, turn, 'WITHSCORES')
return {newest[2], stored}
"""

_TENANT_LUA = """
-- One call per tenant and batch: ARGV[1..6] the rule's settings, then 5 values per event, in event order.
local all, neg, ev, cool = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local window, threshold, min_count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cooldown, evidence_max, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local max_events = __MAX_EVENTS__  -- alerts.tenant_window_max_events, set when the engine builds the script
local replies = {}
local function forget(ids)  -- events that left the window: from the negative set and the evidence too
  for i = 1, #ids, 1000 do  -- in chunks: unpack() returns at most ~8,000 values
    local j = math.min(i + 999, #ids)
    redis.call('ZREM', neg, unpack(ids, i, j))
    redis.call('HDEL', ev, unpack(ids, i, j))
  end
end
for i = 7, #ARGV, 5 do
  local id, ts, is_neg, alert_id = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2] == '1', ARGV[i + 4]
  redis.call('ZADD', all, ts, id)
  if is_neg then
    redis.call('ZADD', neg, ts, id)
    redis.call('HSET', ev, id, ARGV[i + 3])
  else
    redis.call('ZREM', neg, id)
    redis.call('HDEL', ev, id)
  end
  local newest = tonumber(redis.call('ZRANGE', all, -1, -1, 'WITHSCORES')[2])
  local cutoff = '(' .. tostring(newest - window)
  forget(redis.call('ZRANGEBYSCORE', neg, '-inf', cutoff))
  redis.call('ZREMRANGEBYSCORE', all, '-inf', cutoff)
  local over = redis.call('ZCARD', all) - max_events
  if over > 0 then  -- more events than the bound: the oldest leave (the window is the most recent N)
    forget(redis.call('ZRANGE', all, 0, over - 1))
    redis.call('ZREMRANGEBYRANK', all, 0, over - 1)
  end
  local lo = '(' .. tostring(ts - window)
  local total = redis.call('ZCOUNT', all, lo, ts)
  local negs = redis.call('ZCOUNT', neg, lo, ts)
  local fire = 0
  if is_neg and total >= min_count and negs > threshold * total then
    local cur = redis.call('GET', cool)
    if not cur then
      fire = 1
    else
      local sep = string.find(cur, '|', 1, true)
      local cur_id, cur_ts = string.sub(cur, 1, sep - 1), tonumber(string.sub(cur, sep + 1))
      if cur_id == alert_id or ts >= cur_ts + cooldown then fire = 1 end
    end
    if fire == 1 then redis.call('SET', cool, alert_id .. '|' .. tostring(ts), 'EX', ttl) end
  end
  local evidence = {}
  if fire == 1 then
    local ids = redis.call('ZREVRANGEBYSCORE', neg, ts, lo, 'LIMIT', 0, evidence_max)
    if #ids > 0 then evidence = redis.call('HMGET', ev, unpack(ids)) end
  end
  replies[#replies + 1] = {fire, total, negs, evidence}
end
for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
return replies
"""


@dataclass(frozen=True)
class _Turn:
    turn: int
    message_id: str
    speaker: str
    label: str
    probabilities: dict[str, float]
    role: str | None = None

    def to_json(self) -> str:
        return json.dumps({"t": self.turn, "m": self.message_id, "s": self.speaker, "l": self.label,
                           "p": self.probabilities, **({"r": self.role} if self.role else {})},
                          separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "_Turn":
        d = json.loads(raw)
        return cls(int(d["t"]), d["m"], d["s"], d["l"], d["p"], d.get("r"))

    def evidence(self, conversation_id: str) -> AlertEvidence:
        return AlertEvidence(message_id=self.message_id, conversation_id=conversation_id, turn=self.turn,
                             speaker=self.speaker, label=self.label,
                             probability=self.probabilities.get(self.label, 0.0), probabilities=self.probabilities)


def _turn(event: EmotionEvent) -> _Turn:
    return _Turn(event.turn, event.message_id, event.speaker, event.label,
                 {k: round(v, 4) for k, v in event.probabilities.items()}, event.role)


def _keep(s: AlertSettings) -> int:
    """Turns a conversation keeps in its alert state: enough for the longest look-back of a rule; with roles,
    room for other roles' turns between the counted ones (up to three between two)."""
    return max(s.streak_length, s.shift_lookback) * (4 if s.streak_roles or s.shift_roles else 1) + 1


def _check_window_bound(settings: AlertSettings) -> None:
    """``tenant_window_max_events`` is one bound for every tenant's window (a constant of the tenant script), and
    no tenant's ``tenant_min_count`` may need more events than a window holds (its rule could never fire)."""
    for tenant, override in settings.tenants.items():
        if "tenant_window_max_events" in override:
            raise ValueError(f"alerts.tenants.{tenant}: tenant_window_max_events bounds every tenant's window; "
                             "set it for the whole section")
    for tenant in (None, *settings.tenants):
        s = settings.for_tenant(tenant)
        if s.tenant_min_count > settings.tenant_window_max_events:
            where = f"alerts.tenants.{tenant}" if tenant is not None else "alerts"
            raise ValueError(f"{where}: tenant_min_count ({s.tenant_min_count}) is above "
                             f"alerts.tenant_window_max_events ({settings.tenant_window_max_events}): the tenant "
                             "rule could never fire")


class AlertEngine:
    """Evaluates the rules for a batch's events (``evaluate``) and remembers what was sent (``mark_sent``)."""

    def __init__(self, client: redis.Redis, settings: AlertSettings, *, prefix: str, ttl_s: int) -> None:
        self.redis = client
        self.settings = settings
        self.prefix = prefix
        self.ttl_s = ttl_s
        _check_window_bound(settings)
        self._conv = client.register_script(_CONV_LUA)
        self._tenant = client.register_script(
            _TENANT_LUA.replace("__MAX_EVENTS__", str(int(settings.tenant_window_max_events))))
        #: Turns a conversation keeps in its alert state (the default tenant's; see ``_keep``).
        self.keep = _keep(settings)
        #: The configured tenants' settings, built once each. Bounded by ``alerts.tenants``: a tenant name read
        #: from a message never adds an entry (an unconfigured tenant sees the defaults, ``settings``).
        self._by_tenant: dict[str, AlertSettings] = {}

    def settings_for(self, tenant: str | None) -> AlertSettings:
        """The rules' settings for a tenant's events (``alerts.tenants`` overrides), built once per configured
        tenant."""
        if tenant is None or tenant not in self.settings.tenants:
            return self.settings
        s = self._by_tenant.get(tenant)
        if s is None:
            s = self._by_tenant[tenant] = self.settings.for_tenant(tenant)
        return s

    # -- keys --------------------------------------------------------------------------------

    def _conv_key(self, event: EmotionEvent) -> str:
        return f"{self.prefix}:alert:conv:{{{conversation_scope(event.tenant, event.conversation_id)}}}"

    def _tenant_keys(self, tenant: str | None) -> list[str]:
        # The hash tag is never empty: Redis Cluster hashes a key with an empty `{}` whole, which would
        # scatter a tenant-less stream's four keys over slots (the script would fail with CROSSSLOT).
        base = f"{self.prefix}:alert:tenant:{{t={tenant or ''}}}"
        return [f"{base}:all", f"{base}:neg", f"{base}:ev", f"{base}:cool"]

    def _sent_key(self, alert_id: str) -> str:
        return f"{self.prefix}:alert:sent:{alert_id}"

    # -- rules ---------------------------------------------------------------------------------

    def _labels(self, label_set: str, which: dict[str, tuple[str, ...]]) -> frozenset[str]:
        return frozenset(which.get(label_set, ()))

    def _reads_turns(self, event: EmotionEvent, s: AlertSettings) -> bool:
        """Whether a conversation rule looks at the turns stored before this event (only for negative or anger)."""
        return (s.streak_length > 0 and event.label in self._labels(event.label_set, s.negative_labels)) or (
            s.shift and event.label in self._labels(event.label_set, s.anger_labels))

    def evaluate(self, items: Sequence[tuple[EmotionEvent, ChatMessage]]) -> list[Alert]:
        """The alerts the batch's events raise, in order, each alert id once, each event under its tenant's
        settings. Raises redis.RedisError (the caller decides: wait, or that event's failure), or whatever an
        event's rules raised (unreadable state, say): the caller evaluates each event alone and dead-letters the
        one that fails (stage ``alerts``). The scripts are idempotent per turn, so evaluating again is safe."""
        if not items:
            return []
        # One round trip for the whole batch. Events of one conversation run in order, so each
        # sees the turns before it (Lua scripts of a pipeline run one after the other). The tenant rule
        # takes one call per tenant with its events in order (a tenant's keys share one hash tag).
        calls: list = []
        now = time.time()
        per_tenant: dict[str | None, list] = {}
        conv_call: list[int | None] = []  # each event's conversation call, if any
        tenant_slot: list[tuple[str | None, int] | None] = []  # each event's tenant and place in that call
        for event, msg in items:
            s = self.settings_for(event.tenant)
            conv_on = s.enabled and (s.streak_length > 0 or s.shift)
            conv_call.append(len(calls) if conv_on else None)
            if conv_on:
                calls.append((self._conv, [self._conv_key(event)],
                              [event.turn, _turn(event).to_json(), _keep(s), self.ttl_s,
                               "1" if self._reads_turns(event, s) else "0"]))
            if not (s.enabled and s.tenant_threshold < 1):
                tenant_slot.append(None)
                continue
            negative = event.label in self._labels(event.label_set, s.negative_labels)
            ts = min(msg.sent_at.timestamp(), now + _MAX_FUTURE_S)
            # The script reads the evidence and the alert id of negative events only.
            alert_id = self._alert_id("tenant_negative_rate", event) if negative else ""
            evidence = _turn(event).evidence(event.conversation_id).model_dump_json() if negative else ""
            args = per_tenant.setdefault(event.tenant, [])
            tenant_slot.append((event.tenant, len(args) // 5))
            # Members are (conversation, message): message ids are unique only within a conversation.
            member = json.dumps([event.conversation_id, event.message_id], ensure_ascii=False)
            args += [member, ts, "1" if negative else "0", evidence, alert_id]
        first_tenant_call = len(calls)
        for tenant, args in per_tenant.items():
            s = self.settings_for(tenant)
            ttl = int(max(s.tenant_window_s, s.tenant_cooldown_s) * 2) + 3600
            calls.append((self._tenant, self._tenant_keys(tenant),
                          [s.tenant_window_s, s.tenant_threshold, s.tenant_min_count, s.tenant_cooldown_s,
                           s.evidence_max, ttl, *args]))
        if not calls:
            return []
        replies = run_scripts(self.redis, calls)
        tenant_replies = dict(zip(per_tenant, replies[first_tenant_call:]))

        alerts: dict[str, Alert] = {}
        for (event, _), conv_i, slot in zip(items, conv_call, tenant_slot):
            s = self.settings_for(event.tenant)
            found: list[Alert] = []
            if conv_i is not None:
                found += self._conversation_rules(event, replies[conv_i], s)
            if slot is not None:
                found += self._tenant_rule(event, tenant_replies[slot[0]][slot[1]], s)
            for alert in found:
                alerts.setdefault(alert.alert_id, alert)
        return list(alerts.values())

    def _conversation_rules(self, event: EmotionEvent, reply, s: AlertSettings) -> list[Alert]:
        newest, stored = reply
        if newest is not None and event.turn < float(newest) - _keep(s) + 1:
            return []  # a replay older than the kept turns: its history is gone, do not guess
        found: list[Alert] = []
        negative = self._labels(event.label_set, s.negative_labels)
        anger = self._labels(event.label_set, s.anger_labels)
        if not self._reads_turns(event, s):
            return found  # no rule looks at the stored turns of a calm event (nor were they sent)
        turns = {int(float(score)): _Turn.from_json(member) for member, score in zip(stored[::2], stored[1::2])}
        counted = (lambda turn: turn.role in s.streak_roles) if s.streak_roles else (lambda turn: True)
        if s.streak_length > 0 and event.label in negative and counted(_turn(event)):
            streak: list[_Turn] = []
            t = event.turn
            while t in turns and len(streak) <= s.streak_length:
                if counted(turns[t]):  # other roles' turns between are looked through, not counted
                    if turns[t].label not in negative:
                        break
                    streak.append(turns[t])
                t -= 1
            if len(streak) == s.streak_length:  # first reaches the length: once per streak
                streak.reverse()
                found.append(self._alert(
                    "negative_streak", event,
                    summary=f"{len(streak)} negative turns in a row in conversation {event.conversation_id}: "
                            + ", ".join(t.label for t in streak),
                    evidence=[t.evidence(event.conversation_id) for t in streak[-s.evidence_max:]],
                    metrics={"streak_length": float(len(streak))}, conversation_id=event.conversation_id,
                    severity="critical" if any(t.label in self._labels(event.label_set, s.anger_labels)
                                               for t in streak) else "warning",
                ))
        if s.shift and event.label in anger and (not s.shift_roles or event.role in s.shift_roles):
            previous = next((turns[t] for t in range(event.turn - 1, event.turn - s.shift_lookback - 1, -1)
                             if t in turns and turns[t].speaker == event.speaker), None)
            if previous is not None and previous.label in self._labels(event.label_set, s.calm_labels):
                current = turns.get(event.turn) or _turn(event)
                found.append(self._alert(
                    "shift_to_anger", event,
                    summary=f"{event.speaker} went from {previous.label} to {event.label} in conversation "
                            f"{event.conversation_id}",
                    evidence=[previous.evidence(event.conversation_id), current.evidence(event.conversation_id)],
                    metrics={"turns_between": float(event.turn - previous.turn)},
                    conversation_id=event.conversation_id,
                ))
        return found

    def _tenant_rule(self, event: EmotionEvent, reply, s: AlertSettings) -> list[Alert]:
        fire, total, negs, evidence = reply
        if not int(fire):
            return []
        items = [AlertEvidence.model_validate_json(e) for e in evidence if e is not None]
        rate = int(negs) / int(total)
        who = event.tenant if event.tenant is not None else "(no tenant)"
        return [self._alert(
            "tenant_negative_rate", event, conversation_id=None,
            summary=f"tenant {who}: {int(negs)} of {int(total)} events negative ({100 * rate:.0f} %) in the last "
                    f"{s.tenant_window_s:g} s, over the {100 * s.tenant_threshold:.0f} % threshold",
            evidence=items, metrics={"negative_rate": round(rate, 4), "events": float(total),
                                     "negative_events": float(negs), "window_s": float(s.tenant_window_s)},
            severity="critical",
        )]

    @staticmethod
    def _alert_id(rule: str, event: EmotionEvent) -> str:
        return Alert.make_id(rule, tenant=event.tenant, conversation_id=event.conversation_id,
                             trigger_message_id=event.message_id)

    @classmethod
    def _alert(cls, rule: str, event: EmotionEvent, *, summary: str, evidence: list[AlertEvidence],
               metrics: dict[str, float], conversation_id: str | None, severity: str = "warning") -> Alert:
        return Alert(
            alert_id=cls._alert_id(rule, event), rule=rule, severity=severity, summary=summary,
            conversation_id=conversation_id,
            tenant=event.tenant, trigger_message_id=event.message_id, evidence=evidence, metrics=metrics,
            label_set=event.label_set, model=event.model, adapter=event.adapter, adapter_version=event.adapter_version,
        )

    # -- redelivery ----------------------------------------------------------------------------

    def unsent(self, alerts: Sequence[Alert]) -> list[Alert]:
        """The alerts whose id was not recorded as sent yet (a redelivered message's alert was)."""
        if not alerts:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for a in alerts:
            pipe.exists(self._sent_key(a.alert_id))
        return [a for a, seen in zip(alerts, pipe.execute()) if not seen]

    def mark_sent(self, alerts: Sequence[Alert]) -> None:
        """Record alert ids as sent (after the broker acknowledged them)."""
        if not alerts:
            return
        pipe = self.redis.pipeline(transaction=False)
        for a in alerts:
            pipe.set(self._sent_key(a.alert_id), "1", nx=True, ex=self.settings.dedupe_ttl_s)
        pipe.execute()
