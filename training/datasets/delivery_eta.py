"""Food delivery: estimated time of delivery (minutes), a seeded synthetic generator.

Each row is one order. The generator follows how delivery platforms describe their ETA:

    eta = preparation + courier wait + travel + hand-over, with noise

- ``distance_km``: restaurant to customer, log-normal (median ~2.5 km), 0.2-15 km.
- ``hour``: order hour, 10-23, with a lunch peak (12-13 h) and a larger dinner peak (19-20 h).
- ``weekday``: 0 = Monday ... 6 = Sunday; weekends have more orders and lighter traffic.
- ``city``: five cities with their own courier speed (bike/scooter mix, congestion).
- ``prep_time_min``: the restaurant's preparation estimate (gamma, ~12 min); kitchens run late
  at peaks, so the real preparation exceeds the estimate then.
- ``courier_load``: open orders per available courier (higher at peaks and weekends); above
  ~1 order a courier the wait for pickup grows faster than linearly.
- travel time = distance / speed, speed by city, slowed at rush hours (8-9 h, 17-19 h) and
  with a heavy-tailed (log-normal) traffic factor; 2-5 min hand-over at the door.

Target ``eta_min`` is the actual delivery time in minutes. Knowing only the mean is off by
~8 min on average; the features explain most of the rest, which a model must learn (the
interactions are not linear: rush hour x city speed, load's threshold, late kitchens at peaks).
"""

from __future__ import annotations

import numpy as np

from .tabular import encode_table

DATA_SEED = 2024
DEFAULT_ROWS = 12_000
CITIES = {  # median courier speed, km/h
    "amsterdam": 19.0,
    "berlin": 17.0,
    "london": 14.0,
    "madrid": 15.5,
    "warsaw": 16.5,
}


def generate_orders(n: int = DEFAULT_ROWS, seed: int = DATA_SEED) -> dict[str, np.ndarray]:
    """The raw order table, column by column (numbers, and the city as text)."""
    rng = np.random.default_rng(seed)
    city_names = np.array(sorted(CITIES))
    city = rng.choice(city_names, size=n, p=[0.15, 0.25, 0.3, 0.15, 0.15])
    weekday = rng.choice(7, size=n, p=[0.12, 0.12, 0.13, 0.14, 0.16, 0.17, 0.16])
    weekend = weekday >= 5

    # order hour: a mixture of lunch and dinner peaks over an opening-hours floor
    component = rng.choice(3, size=n, p=[0.3, 0.5, 0.2])
    hour = np.where(
        component == 0, rng.normal(12.5, 1.0, n),
        np.where(component == 1, rng.normal(19.5, 1.3, n), rng.uniform(10, 24, n)),
    )
    hour = np.clip(np.floor(hour), 10, 23).astype(int)
    peak = np.isin(hour, [12, 13, 19, 20])

    distance = np.clip(rng.lognormal(np.log(2.5), 0.6, n), 0.2, 15.0)
    prep_estimate = np.clip(rng.gamma(6.0, 2.0, n), 3.0, 45.0)
    load = np.clip(rng.gamma(2.0, 0.35, n) + 0.6 * peak + 0.3 * weekend, 0.1, 5.0)

    prep_actual = prep_estimate * np.where(peak, 1.25, 1.0) * rng.lognormal(0.0, 0.12, n)
    courier_wait = 2.0 + 6.0 * np.maximum(load - 1.0, 0.0) ** 1.4 + rng.exponential(1.5, n)
    rush = np.isin(hour, [8, 9, 17, 18, 19]) & ~weekend
    base_speed = np.vectorize(CITIES.get)(city)
    speed = base_speed * np.where(rush, 0.7, 1.0) * np.where(weekend, 1.1, 1.0)
    speed = speed * rng.lognormal(0.0, 0.15, n)
    travel = distance / speed * 60.0
    handover = rng.uniform(2.0, 5.0, n)
    # the courier can start travelling only once both the food and the courier are there
    eta = np.maximum(prep_actual, courier_wait) + travel + handover

    return {
        "distance_km": np.round(distance, 2),
        "hour": hour,
        "weekday": weekday,
        "city": city,
        "prep_time_min": np.round(prep_estimate, 1),
        "courier_load": np.round(load, 2),
        "eta_min": np.round(eta, 1),
    }


def load_delivery_eta(n: int = DEFAULT_ROWS, seed: int = DATA_SEED):
    orders = generate_orders(n, seed)
    columns = {name: [str(v) for v in values] for name, values in orders.items()}
    dataset = encode_table(
        columns,
        "eta_min",
        name="delivery-eta",
        task="regression",
        description=f"food delivery ETA in minutes, synthetic, {n} orders, seed {seed}",
        source="generated",
    )
    dataset.extra.update({"generator_seed": seed, "rows": n})
    return dataset
