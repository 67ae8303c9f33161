"""Demo data: realistic sessions with messages, written as the chat application writes them.

The layout is docs/contract.md §1: the session ID in the ``sessions`` set, the session
as a hash, its messages in a zset (member: the message as JSON; score: its
``created_at`` in epoch milliseconds). Each session is written in one
MULTI/EXEC, so a backup running meanwhile never sees half of one.

Demo session IDs are fixed (``uuid5`` of the demo's index): ``--demo 5`` run
twice still makes five sessions, and sessions already there are left alone.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from worker.keys import RedisKeys
from worker.records import epoch_ms, format_timestamp

# Fixed namespace of the demo sessions' IDs.
DEMO_NAMESPACE = uuid.UUID("6f1d3f0e-3b0a-4c55-9a53-2d3c1e4f5a60")

_CAMPAIGNS = (
    "The Sunless Citadel",
    "Curse of the Crimson Throne",
    "Lost Mine of Phandelver",
    "Tomb of the Serpent Kings",
    "The Sea Witch's Bargain",
    "Storm King's Thunder",
    "The Gauntlet of Ash",
    "Dragons of Icespire Peak",
    "The Clockwork Abbey",
    "Shadows over Saltmarsh",
)
_PLAYERS = ("aria", "brom", "celeste", "dain", "elowen", "fenwick", "gorim", "hesper")
_PLAYER_LINES = (
    "I check the door for traps before anyone touches it.",
    "Can I try to persuade the guard that we're merchants from Waterdeep?",
    "I cast Light on my shield and lead the way down the stairs.",
    "What do I know about this symbol? I'd like to roll History.",
    "I keep watch while the others search the room.",
    "Let's rest here for an hour and tend our wounds.",
    "I sneak up behind the goblin and try to knock it out.",
    "How far is the chasm? Can I jump it?",
    "I offer the old woman a gold piece for the map.",
    "I ready my crossbow and wait for it to come around the corner.",
)
_NARRATION = (
    "The torchlight flickers across damp stone; somewhere below, water drips in a slow rhythm.",
    "The guard squints at you, then at your cart, and finally steps aside with a grunt.",
    "A cold draft carries the smell of old smoke. The corridor splits left and right.",
    "The symbol is Thayan: a mark of the Red Wizards, carved long ago and half worn away.",
    "Nothing stirs for an hour. Then, faintly, you hear claws on stone far off.",
    "The goblin crumples without a sound. Its pouch holds three copper coins and a bone key.",
    "The chasm is about fifteen feet across, its far edge slick with moss.",
    "She bites the coin, nods, and slides a stained parchment across the table.",
)
_SYSTEM = (
    "You are the Dungeon Master of a tabletop role-playing game. Describe the world "
    "vividly, keep the players' choices meaningful, and use the dice tool for checks."
)


@dataclass(frozen=True, slots=True)
class DemoResult:
    written: int
    already_there: int
    messages: int


def demo_session_id(index: int) -> str:
    return str(uuid.uuid5(DEMO_NAMESPACE, f"demo-session-{index}"))


def demo_session(index: int, now: datetime) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The hash and the messages of demo session ``index`` (the same index, the same content)."""
    rng = random.Random(index)
    session_id = demo_session_id(index)
    players = rng.sample(_PLAYERS, rng.randint(2, 4))
    started = now - timedelta(
        days=rng.randint(1, 20), minutes=rng.randint(0, 600), milliseconds=rng.randint(0, 999)
    )
    messages = _conversation(rng, session_id, players, started, count=rng.randint(8, 40))
    last = messages[-1]["created_at"] if messages else format_timestamp(started)
    fields = {
        "id": session_id,
        "name": _CAMPAIGNS[index % len(_CAMPAIGNS)],
        "creator_id": f"user-{players[0]}",
        "mcp_server_url": f"http://localhost:{9000 + index % 10}/mcp",
        "websocket_key": f"{rng.getrandbits(128):032x}",
        "max_players": str(rng.randint(max(3, len(players)), 6)),
        "settings": json.dumps(
            {
                "ruleset": "5e",
                "dice": "d20",
                "difficulty": rng.choice(["easy", "normal", "hard"]),
                "house_rules": rng.sample(
                    ["flanking", "critical fumbles", "lingering injuries", "group initiative"], 2
                ),
            }
        ),
        "created_at": format_timestamp(started),
        "updated_at": last,
        "status": "active",
    }
    return fields, messages


def _conversation(
    rng: random.Random, session_id: str, players: Sequence[str], started: datetime, count: int
) -> list[dict[str, Any]]:
    when = started
    out: list[dict[str, Any]] = []

    def add(
        role: str, content: str | None, player: str | None = None, tool_calls: Any = None
    ) -> None:
        nonlocal when
        out.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "session_id": session_id,
                "created_at": format_timestamp(when),
                "role": role,
                "content": content,
                "tool_calls": tool_calls,
                "player_id": player,
            }
        )
        when += timedelta(seconds=rng.randint(4, 90), milliseconds=rng.randint(0, 999))

    add("system", _SYSTEM)
    while len(out) < count:
        player = rng.choice(players)
        add("user", rng.choice(_PLAYER_LINES), player=f"player-{player}")
        if rng.random() < 0.3:
            dice = rng.choice(["1d20", "1d20+3", "2d6", "1d8+2"])
            call_id = f"call_{rng.getrandbits(48):012x}"
            add(
                "assistant",
                None,
                tool_calls=[
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "roll_dice", "arguments": json.dumps({"dice": dice})},
                    }
                ],
            )
            add(
                "tool",
                json.dumps({"tool_call_id": call_id, "dice": dice, "result": rng.randint(1, 20)}),
            )
        add("assistant", rng.choice(_NARRATION))
    return out


def write_demo_sessions(
    client: redis.Redis, keys: RedisKeys, count: int, now: datetime | None = None
) -> DemoResult:
    """Make sure demo sessions 1..count exist; returns what was written."""
    now = now or datetime.now(UTC)
    written = already = total = 0
    for index in range(1, count + 1):
        session_id = demo_session_id(index)
        if client.exists(keys.session(session_id)):
            client.sadd(keys.sessions, session_id)
            already += 1
            continue
        fields, messages = demo_session(index, now)
        members = {
            json.dumps(m, separators=(",", ":"), ensure_ascii=False): epoch_ms(
                datetime.fromisoformat(m["created_at"].replace("Z", "+00:00"))
            )
            for m in messages
        }
        mapping: dict[Any, Any] = dict(fields)  # redis-py's mapping type is invariant
        pipe = client.pipeline(transaction=True)
        pipe.hset(keys.session(session_id), mapping=mapping)
        pipe.zadd(keys.messages(session_id), members)
        pipe.sadd(keys.sessions, session_id)
        pipe.execute()
        written += 1
        total += len(messages)
    return DemoResult(written=written, already_there=already, messages=total)
