"""A synthetic population for identity benchmarks, reproducible from a seed.

People have one user ID, one or two hashed emails, sometimes a hashed phone, and one
to four devices (anonymous IDs). Sightings are what trackers send: identify calls
(device + user), email captures (user + email), logins on new devices; 1 % of
devices are shared by two people (their second user is refused), 2 % of sightings
carry a junk ID ("undefined", "null", ...), and 1 % arrive late (time shifted back),
which exercises re-resolution.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from identity.operations import RawSighting

JUNK = ("undefined", "null", "None", "0", "anonymous", "[object Object]")
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Population:
    people: int
    links: int
    seed: int = 7

    def sightings(self) -> Iterator[RawSighting]:
        """Two-identifier sightings (one link each), in roughly increasing time."""
        rng = random.Random(self.seed)
        devices: list[list[str]] = []
        for person in range(self.people):
            devices.append([f"anon-{person}-{d}" for d in range(rng.randint(1, 4))])
        moment = START
        step = timedelta(seconds=30 * 86400 / max(self.links, 1))
        for n in range(self.links):
            moment += step
            person = rng.randrange(self.people)
            kind = rng.random()
            user = ("user_id", f"user-{person}")
            if kind < 0.45:
                device = rng.choice(devices[person])
                if rng.random() < 0.01:  # a shared device: another person's
                    device = rng.choice(devices[rng.randrange(self.people)])
                pair = [("anonymous_id", device), user]
            elif kind < 0.75:
                email = hashlib.sha256(f"person{person}.{rng.randint(0, 1)}@example.org".encode()).hexdigest()
                pair = [user, ("email_sha256", email)]
            elif kind < 0.85:
                phone = hashlib.sha256(f"+1555{person:07d}".encode()).hexdigest()
                pair = [user, ("phone_sha256", phone)]
            else:  # a brand-new device logging in
                new_device = f"anon-{person}-x{n}"
                devices[person].append(new_device)
                pair = [("anonymous_id", new_device), user]
            if rng.random() < 0.02:
                pair[0] = ("anonymous_id", rng.choice(JUNK))
            occurred = moment - timedelta(hours=rng.randint(1, 48)) if rng.random() < 0.01 else moment
            yield RawSighting(pair, occurred, "bench", f"ev-{n}")
