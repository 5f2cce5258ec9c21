"""The policy model (waves, caps, quiet hours, tier intensity, experiments, fatigue) and the
shipped `default` policy with the figures of DOMAIN.md.

A policy is plain validated data: the rules in `domain.py` read it, nothing else decides.
A policy that makes no sense is refused by validation with the offending field named.
"""

from __future__ import annotations

from datetime import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.events import Channel, MessageContent, Wave

WAVES: tuple[Wave, ...] = ("launch", "day3", "day7", "day14", "day30")
CHANNELS: tuple[Channel, ...] = ("sms", "email", "push", "in_app", "social")
FatigueStateName = Literal["normal", "low_frequency", "suppressed"]
FatigueSignal = Literal[
    "complained", "unsubscribed", "ignored_streak", "silence", "opened", "clicked"
]


class PolicyError(ValueError):
    """A policy that makes no sense; `field` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WaveSpec(_Model):
    """One follow-up wave, timed relative to the promotion's end."""

    name: Wave
    purpose: str = ""
    after_days: int = Field(ge=0, le=365)
    # Wall-clock time in the user's timezone on day `after_days`; None: exactly
    # `after_days` after the end (the launch goes out at once).
    local_time: time | None = None
    # No longer worth sending this many hours after the end.
    deadline_hours: float = Field(gt=0)
    # For users the segment marks silent: the wave moves to this day (day 2 of the
    # "day 2 to day 5" window); its deadline is unchanged.
    silent_after_days: int | None = Field(None, ge=0, le=365)
    coupon: bool = False
    essential: bool = False
    # Fallback order of channels when the segment states no preference.
    channels: list[Channel] = Field(min_length=1)
    # Value layers that get two channels at once (SMS + push on day 7 for core users).
    pair_value_layers: list[str] = Field(default_factory=list)
    # variant -> channel -> template; `${name}` placeholders come from the touch's variables.
    content: dict[str, dict[Channel, MessageContent]] = Field(min_length=1)


class Caps(_Model):
    """Touches per user per rolling window, across every promotion."""

    per_7d: int = Field(2)
    per_30d: int = Field(5)


class QuietHours(_Model):
    """No touch in [start, end) of the user's local time; start == end: no quiet hours."""

    start: time = time(21, 0)
    end: time = time(9, 0)


class Variant(_Model):
    name: str = Field(min_length=1, max_length=32)
    share: float = Field(gt=0, le=1)


class Experiment(_Model):
    holdout_share: float = Field(0.10, ge=0, lt=1)
    wave_holdout_share: float = Field(0.05, ge=0, lt=1)
    variants: list[Variant] = Field(min_length=1)


class TierIntensity(_Model):
    waves: list[Wave]
    # Waves that carry a coupon for this tier even if the wave itself does not.
    coupon_waves: list[Wave] = Field(default_factory=list)


class Transition(_Model):
    """On `signal`, from any state in `from_states` (empty: any), go to `to`.

    `to = "paused"` pauses the signal's channel only; the overall state stays.
    """

    signal: FatigueSignal
    from_states: list[FatigueStateName] = Field(default_factory=list)
    to: Literal["normal", "low_frequency", "suppressed", "paused"]


class Fatigue(_Model):
    ignored_streak: int = Field(3, ge=1)
    silence_days: int = Field(30, ge=1)
    transitions: list[Transition]


class Policy(_Model):
    waves: list[WaveSpec] = Field(min_length=1)
    caps: Caps = Caps()
    quiet_hours: QuietHours = QuietHours()
    # Among touches due together for one user, the first in this list wins the free slot;
    # ties go to the promotion that ended first.
    wave_priority: list[Wave] = Field(default_factory=lambda: list(WAVES))
    # ltv_tier -> which waves; a tier not listed (or no segment data) gets every wave.
    intensity: dict[str, TierIntensity] = Field(default_factory=dict)
    experiment: Experiment
    fatigue: Fatigue

    @model_validator(mode="after")
    def _makes_sense(self) -> Policy:
        check(self)
        return self

    def wave(self, name: str) -> WaveSpec | None:
        return next((w for w in self.waves if w.name == name), None)


def check(policy: Policy) -> None:
    """Refuse a policy that makes no sense, naming the field."""
    if policy.caps.per_7d < 1:
        raise PolicyError("caps.per_7d", "a cap must allow at least one touch")
    if policy.caps.per_30d < 1:
        raise PolicyError("caps.per_30d", "a cap must allow at least one touch")
    if policy.caps.per_30d < policy.caps.per_7d:
        raise PolicyError("caps.per_30d", "must be at least caps.per_7d")
    seen: set[str] = set()
    last_day = -1
    for i, wave in enumerate(policy.waves):
        where = f"waves[{i}]"
        if wave.name in seen:
            raise PolicyError(f"{where}.name", f"wave {wave.name!r} appears twice")
        seen.add(wave.name)
        if wave.after_days < last_day:
            raise PolicyError(f"{where}.after_days", "waves must be listed in time order")
        last_day = wave.after_days
        latest_due_h = wave.after_days * 24 + (24 if wave.local_time is not None else 0)
        if wave.deadline_hours <= wave.after_days * 24:
            raise PolicyError(f"{where}.deadline_hours", "the wave comes after its deadline")
        if wave.local_time is not None and wave.deadline_hours < latest_due_h:
            raise PolicyError(
                f"{where}.deadline_hours",
                f"a wave at a local time on day {wave.after_days} needs a deadline of at "
                f"least {latest_due_h} hours",
            )
        if wave.silent_after_days is not None and wave.silent_after_days * 24 >= (
            wave.deadline_hours
        ):
            raise PolicyError(f"{where}.silent_after_days", "comes after the wave's deadline")
        names = {v.name for v in policy.experiment.variants}
        for variant in names:
            if variant not in wave.content:
                raise PolicyError(f"{where}.content", f"no content for variant {variant!r}")
        for variant, by_channel in wave.content.items():
            if variant not in names:
                raise PolicyError(f"{where}.content.{variant}", "not a variant of the experiment")
            if not by_channel:
                raise PolicyError(f"{where}.content.{variant}", "needs at least one channel")
    total = sum(v.share for v in policy.experiment.variants)
    if abs(total - 1.0) > 1e-6:
        raise PolicyError("experiment.variants", f"shares must add up to 1, not {total:g}")
    if len({v.name for v in policy.experiment.variants}) != len(policy.experiment.variants):
        raise PolicyError("experiment.variants", "variant names must be unique")
    for i, name in enumerate(policy.wave_priority):
        if name not in seen:
            raise PolicyError(f"wave_priority[{i}]", f"{name!r} is not a wave of this policy")
    for tier, intensity in policy.intensity.items():
        for i, name in enumerate(intensity.waves):
            if name not in seen:
                raise PolicyError(f"intensity.{tier}.waves[{i}]", f"{name!r} is not a wave")
    if policy.quiet_hours.start != policy.quiet_hours.end:
        gap = _minutes(policy.quiet_hours.end) - _minutes(policy.quiet_hours.start)
        if gap % (24 * 60) == 0:
            raise PolicyError("quiet_hours", "quiet hours must leave some time to send")


def _minutes(t: time) -> int:
    return t.hour * 60 + t.minute


def _content(wave: str, purpose: str, coupon: bool) -> dict[str, dict[Channel, MessageContent]]:
    offer = " Your coupon: ${coupon_code}." if coupon else ""
    subjects = {"A": f"{purpose}", "B": f"${{promotion_name}}: {purpose.lower()}"}
    out: dict[str, dict[Channel, MessageContent]] = {}
    for variant, subject in subjects.items():
        out[variant] = {
            channel: MessageContent(
                subject=subject if channel == "email" else "",
                body=f"[{wave}/{variant}] {purpose} after ${{promotion_name}}.{offer}",
            )
            for channel in CHANNELS
        }
    return out


def default_policy() -> Policy:
    """DOMAIN.md's figures: five waves, 2 per 7 days and 5 per 30 days, quiet 21:00-09:00."""
    ten = time(10, 0)
    return Policy(
        waves=[
            WaveSpec(
                name="launch",
                purpose="Thank you for your order",
                after_days=0,
                deadline_hours=2,
                essential=True,
                channels=["email", "in_app", "push", "sms"],
                content=_content("launch", "Thank you for your order", False),
            ),
            WaveSpec(
                name="day3",
                purpose="A small thank-you coupon",
                after_days=3,
                local_time=ten,
                deadline_hours=5 * 24,
                silent_after_days=2,
                coupon=True,
                channels=["sms", "push", "email"],
                content=_content("day3", "A small thank-you coupon", True),
            ),
            WaveSpec(
                name="day7",
                purpose="Picked for you",
                after_days=7,
                local_time=ten,
                deadline_hours=10 * 24,
                essential=True,
                channels=["sms", "push", "email"],
                pair_value_layers=["core"],
                content=_content("day7", "Picked for you", False),
            ),
            WaveSpec(
                name="day14",
                purpose="Member-only preview",
                after_days=14,
                local_time=ten,
                deadline_hours=20 * 24,
                channels=["push", "social", "email"],
                content=_content("day14", "Member-only preview", False),
            ),
            WaveSpec(
                name="day30",
                purpose="Ready for the next season",
                after_days=30,
                local_time=ten,
                deadline_hours=40 * 24,
                essential=True,
                channels=["email", "push", "sms", "social"],
                content=_content("day30", "Ready for the next season", False),
            ),
        ],
        caps=Caps(per_7d=2, per_30d=5),
        quiet_hours=QuietHours(start=time(21, 0), end=time(9, 0)),
        wave_priority=list(WAVES),
        # DOMAIN.md's intensity per LTV tier, with every wave sent to some tier: high
        # potential gets the launch and one personalised touch a month after it; potential
        # churn two touches a week apart within two weeks (day 7, the cross-sell sprint where
        # core users get SMS and push together, and day 14); silent the launch and a wake-up
        # with a coupon.
        intensity={
            "high_potential": TierIntensity(waves=["launch", "day30"]),
            "potential_churn": TierIntensity(waves=["day7", "day14"]),
            "silent": TierIntensity(waves=["launch", "day3"], coupon_waves=["day3"]),
        },
        experiment=Experiment(
            holdout_share=0.10,
            wave_holdout_share=0.05,
            variants=[Variant(name="A", share=0.5), Variant(name="B", share=0.5)],
        ),
        fatigue=Fatigue(
            ignored_streak=3,
            silence_days=30,
            transitions=[
                Transition(signal="complained", to="suppressed"),
                Transition(signal="unsubscribed", to="paused"),
                Transition(signal="ignored_streak", from_states=["normal"], to="low_frequency"),
                Transition(signal="silence", from_states=["normal"], to="low_frequency"),
                Transition(signal="opened", from_states=["low_frequency"], to="normal"),
                Transition(signal="clicked", from_states=["low_frequency"], to="normal"),
            ],
        ),
    )
