"""Training sets cut from the shared data, for trying ptedge's defaults on data sizes and
label sets they were not chosen on (`python tools/bench_quality.py --data runs/unseen/NAME`).

Writes, from one `random.Random(1)` in this order:

- `runs/unseen/b77-20pl/`: 20 training sentences per BANKING77 intent (1,540; shuffled),
  `test.csv` the full BANKING77 test split;
- `runs/unseen/sst2-1k/`: 1,000 SST-2 training sentences, `test.tsv` the full test split;
- `runs/unseen/clinc-domains-N/`, N = 50, 20, 200: CLINC150's queries labelled with their
  intent's domain (10: banking, credit cards, kitchen and dining, home, auto and commute,
  travel, utility, work, small talk, meta; the mapping of the data set's own
  `data/domains.json`, clinc/oos-eval, CC BY 3.0), N training queries per domain
  (shuffled), `test.csv` CLINC150's in-scope test split (4,500), relabelled; and
  `clinc-domains-all/` with all 15,000 training queries. A label set no default was chosen on.

None has a dev file, so ptedge carves one. Not a benchmark itself; results in
`docs/results/analyses.md` ("small training sets", "an unseen label set").

    python tools/small_sets.py
"""

from __future__ import annotations

import csv
import random
import shutil
from collections import defaultdict

import _bench_common as bc

PER_INTENT, SST2_N, SEED = 20, 1000, 1
PER_DOMAIN = (
    50,
    20,
    200,
)  # training queries per domain of the clinc-domains-N sets, drawn in this order
# CLINC150's domains and their intents (clinc/oos-eval, data/domains.json)
DOMAINS = {
    "banking": "freeze_account routing pin_change bill_due pay_bill account_blocked "
    "interest_rate min_payment bill_balance transfer order_checks balance spending_history "
    "transactions report_fraud",
    "credit_cards": "replacement_card_duration expiration_date damaged_card "
    "improve_credit_score report_lost_card card_declined credit_limit_change apr "
    "redeem_rewards credit_limit rewards_balance application_status credit_score new_card "
    "international_fees",
    "kitchen_and_dining": "food_last confirm_reservation how_busy ingredients_list calories "
    "nutrition_info recipe restaurant_reviews restaurant_reservation meal_suggestion "
    "restaurant_suggestion cancel_reservation ingredient_substitution cook_time "
    "accept_reservations",
    "home": "what_song play_music todo_list_update reminder reminder_update calendar_update "
    "order_status update_playlist shopping_list calendar next_song order todo_list "
    "shopping_list_update smart_home",
    "auto_and_commute": "current_location oil_change_when oil_change_how uber traffic "
    "tire_pressure schedule_maintenance gas mpg distance directions last_maintenance gas_type "
    "tire_change jump_start",
    "travel": "plug_type travel_notification translate flight_status international_visa "
    "timezone exchange_rate travel_suggestion travel_alert vaccines lost_luggage book_flight "
    "book_hotel carry_on car_rental",
    "utility": "weather alarm date find_phone share_location timer make_call calculator "
    "definition measurement_conversion flip_coin spelling time roll_dice text",
    "work": "pto_request_status next_holiday insurance_change insurance meeting_schedule payday "
    "taxes income rollover_401k pto_balance pto_request w2 schedule_meeting direct_deposit "
    "pto_used",
    "small_talk": "who_made_you meaning_of_life who_do_you_work_for do_you_have_pets "
    "what_are_your_hobbies fun_fact what_is_your_name where_are_you_from goodbye thank_you "
    "greeting tell_joke are_you_a_bot how_old_are_you what_can_i_ask_you",
    "meta": "change_speed user_name whisper_mode yes change_volume no change_language repeat "
    "change_accent cancel sync_device change_user_name change_ai_name reset_settings maybe",
}


def _write_csv(path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    rng = random.Random(SEED)
    out = bc.ROOT / "runs" / "unseen"
    b77, sst2 = bc.need_data("banking77"), bc.need_data("sst2")

    with open(b77 / "train.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_intent: dict[str, list] = defaultdict(list)
    for r in rows:
        by_intent[r["category"]].append(r)
    keep = [r for k in sorted(by_intent) for r in rng.sample(by_intent[k], PER_INTENT)]
    rng.shuffle(keep)
    folder = out / "b77-20pl"
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(folder / "train.csv", keep, ["text", "category"])
    shutil.copy(b77 / "test.csv", folder / "test.csv")

    header, *body = (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    folder = out / "sst2-1k"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header, *rng.sample(body, SST2_N)]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(sst2 / "test.tsv", folder / "test.tsv")
    print(f"wrote {out / 'b77-20pl'} ({len(keep)} records), {folder} ({SST2_N} records)")

    by_domain: dict[str, list] = defaultdict(list)
    train = by_domain_records("train.csv")
    for r in train:
        by_domain[r["domain"]].append(r)
    test = by_domain_records("test.csv")
    for per in PER_DOMAIN:
        keep = [r for d in sorted(by_domain) for r in rng.sample(by_domain[d], per)]
        rng.shuffle(keep)
        _domain_set(out / f"clinc-domains-{per}", keep, test)
    _domain_set(out / "clinc-domains-all", train, test)


def by_domain_records(name: str) -> list[dict]:
    """CLINC150's file ``name`` (``train.csv``, ``dev.csv``, ``test.csv``) as ``text`` and
    ``domain`` records: each in-scope query labelled with its intent's domain."""
    domain_of = {i: d for d, intents in DOMAINS.items() for i in intents.split()}
    with open(bc.need_data("clinc150") / name, newline="", encoding="utf-8") as f:
        return [{"text": r["text"], "domain": domain_of[r["intent"]]} for r in csv.DictReader(f)]


def _domain_set(folder, train: list[dict], test: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(folder / "train.csv", train, ["text", "domain"])
    _write_csv(folder / "test.csv", test, ["text", "domain"])
    print(f"wrote {folder} ({len(train)} records)")


if __name__ == "__main__":
    main()
