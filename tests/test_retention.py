"""workflows.retention: restic's keep rules, checked against restic's documented examples and by hand."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from workflows.retention import Backup, check_rules, select

UTC = timezone.utc


def at(s: str, tz: timezone = UTC) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=tz)


def daily(start: str, days: int, hour: int = 11) -> list[Backup]:
    t0 = at(start) + timedelta(hours=hour)
    return [Backup(f"b{i:03d}", t0 + timedelta(days=i)) for i in range(days)]


# -- restic's documentation (doc/060_forget.rst) --------------------------------------------------
SUNDAYS = ["2019-09-01", "2019-09-08", "2019-09-15", "2019-09-22", "2019-09-29", "2019-10-06", "2019-10-13",
           "2019-10-20", "2019-10-27", "2019-11-03", "2019-11-10", "2019-11-17"]


def sundays() -> list[Backup]:
    return [Backup(d, at(d + "T11:00:00")) for d in SUNDAYS]


def test_restic_twelve_sundays_keep_daily_4():
    sel = select(sundays(), {"keep_daily": 4})
    assert sel.keep == ["2019-11-17", "2019-11-10", "2019-11-03", "2019-10-27"]
    assert sorted(sel.remove) == SUNDAYS[:8]


def test_restic_twelve_sundays_keep_weekly_and_monthly():
    # one backup a week: --keep-weekly 2 keeps the last two; --keep-monthly 3 the newest of Nov, Oct, Sep
    sel = select(sundays(), {"keep_weekly": 2, "keep_monthly": 3})
    assert sel.keep == ["2019-11-17", "2019-11-10", "2019-10-27", "2019-09-29"]
    assert sel.reasons["2019-11-17"] == ["weekly", "monthly"]


def test_restic_hundred_years_of_dailies():
    """--keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-yearly 75 over daily backups: 7 dailies,
    4 more weeklies (the dailies hold one, or two), 12 or 11 monthlies, 75 or 74 yearlies."""
    backups = daily("1925-01-01", 365 * 100 + 25)
    sel = select(backups, {"keep_daily": 7, "keep_weekly": 5, "keep_monthly": 12, "keep_yearly": 75})
    reasons = sel.reasons
    assert sum("daily" in r for r in reasons.values()) == 7
    assert sum("weekly" in r for r in reasons.values()) == 5
    # 7 consecutive days hold one week's end, or two when they straddle a Sunday
    assert len([k for k, r in reasons.items() if "weekly" in r and "daily" not in r]) in (3, 4)
    assert sum("monthly" in r for r in reasons.values()) == 12
    assert sum("yearly" in r for r in reasons.values()) == 75
    assert 7 + 3 + 11 + 74 <= len(sel.keep) <= 7 + 5 + 12 + 75


def test_fewer_backups_than_counts_keeps_the_oldest_too():
    # restic: "If there are not enough snapshots to keep one for each duration related option, the oldest
    # snapshot is kept additionally"
    backups = [Backup("a", at("2024-05-01T10:00")), Backup("b", at("2024-05-01T12:00"))]
    sel = select(backups, {"keep_daily": 5})
    assert sel.keep == ["b", "a"] and sel.remove == []
    assert select(backups, {"keep_daily": 1}).keep == ["b"]


# -- each rule ---------------------------------------------------------------------------------------
def test_keep_last_counts_each_backup():
    backups = daily("2024-01-01", 10)
    assert select(backups, {"keep_last": 3}).keep == ["b009", "b008", "b007"]
    assert select(backups, {"keep_last": 3}).remove == [f"b{i:03d}" for i in range(6, -1, -1)]


def test_hourly_keeps_the_newest_of_each_hour():
    backups = [Backup(f"h{i}", at("2024-03-01T00:00") + timedelta(minutes=20 * i)) for i in range(9)]  # 3 hours
    sel = select(backups, {"keep_hourly": 2})
    assert sel.keep == ["h8", "h5"]


def test_weekly_uses_iso_weeks_across_the_new_year():
    # 2020-12-31 (Thu) and 2021-01-03 (Sun) are both in ISO week 2020-W53
    backups = [Backup("thu", at("2020-12-31T10:00")), Backup("sun", at("2021-01-03T10:00")),
               Backup("mon", at("2021-01-04T10:00"))]
    assert select(backups, {"keep_weekly": 2}).keep == ["mon", "sun"]
    assert select(backups, {"keep_yearly": 2}).keep == ["mon", "thu"]


def test_monthly_and_yearly():
    backups = daily("2022-11-15", 120)  # 2022-11-15 .. 2023-03-14
    sel = select(backups, {"keep_monthly": 3})
    times = {b.id: b.time for b in backups}
    assert [times[k].strftime("%Y-%m-%d") for k in sel.keep] == ["2023-03-14", "2023-02-28", "2023-01-31"]
    assert [times[k].strftime("%Y-%m-%d") for k in select(backups, {"keep_yearly": 5}).keep] == \
        ["2023-03-14", "2022-12-31", "2022-11-15"]  # the last is the oldest, kept while counts are left


def test_rules_are_ored_and_counted_each():
    backups = daily("2024-01-01", 30)
    sel = select(backups, {"keep_last": 2, "keep_daily": 3})
    assert sel.keep == ["b029", "b028", "b027"]
    assert sel.reasons["b029"] == ["last", "daily"] and sel.reasons["b027"] == ["daily"]


def test_unlimited():
    backups = daily("2024-01-01", 10)
    assert len(select(backups, {"keep_daily": -1}).keep) == 10
    assert select(backups, {"keep_weekly": -1}).keep == ["b009", "b006", "b000"]  # W2, W1, the oldest


def test_time_zone_of_each_backup_decides_its_day():
    # 23:30 UTC on the 1st is 01:30 on the 2nd in UTC+2: a backup's day is the day where it was taken
    plus2 = timezone(timedelta(hours=2))
    y0, y1, y2 = at("2024-06-01T10:00"), at("2024-06-01T22:30"), at("2024-06-01T23:30")
    in_utc = [Backup("y0", y0), Backup("y1", y1), Backup("y2", y2)]
    assert select(in_utc, {"keep_daily": 2}).keep == ["y2", "y0"]  # one day, then the oldest
    local = [Backup("y0", y0), Backup("y1", y1), Backup("y2", y2.astimezone(plus2))]
    assert select(local, {"keep_daily": 2}).keep == ["y2", "y1"]  # two days


def test_order_of_input_does_not_matter():
    backups = daily("2024-01-01", 20)
    assert select(list(reversed(backups)), {"keep_daily": 4, "keep_weekly": 2}).keep == \
        select(backups, {"keep_daily": 4, "keep_weekly": 2}).keep


def test_empty_policy_keeps_everything():
    backups = daily("2024-01-01", 3)
    assert select(backups, {}).keep == ["b002", "b001", "b000"]
    assert select(backups, {"keep_last": 0}).remove == []


def test_no_backups():
    sel = select([], {"keep_last": 3})
    assert sel.keep == [] and sel.remove == []


@pytest.mark.parametrize("rules, words", [
    ({"keep_dayly": 1}, "unknown retention rule 'keep_dayly'"),
    ({"keep_last": -2}, "keep_last must be a whole number"),
    ({"keep_last": "3"}, "keep_last must be a whole number"),
    ({"keep_last": True}, "keep_last must be a whole number"),
])
def test_bad_rules_are_named(rules, words):
    with pytest.raises(ValueError, match=words):
        check_rules(rules)


def test_naive_time_is_refused():
    with pytest.raises(ValueError, match="has no time zone"):
        select([Backup("x", datetime(2024, 1, 1))], {"keep_last": 1})
