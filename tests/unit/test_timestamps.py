"""Timestamps of worker.records: parse_timestamp, format_timestamp, epoch_ms."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.records import RecordRejected, epoch_ms, format_timestamp, parse_timestamp


def utc(year: int, month: int, day: int, *time: int) -> datetime:
    hour, minute, second, micro = (*time, 0, 0, 0, 0)[:4]
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Go writes nanoseconds and the local offset; they are truncated to microseconds.
        ("2026-02-12T10:00:00.123456789+08:00", utc(2026, 2, 12, 2, 0, 0, 123456)),
        ("2026-02-12T10:00:00Z", utc(2026, 2, 12, 10, 0, 0)),
        ("2026-02-12T10:00:00z", utc(2026, 2, 12, 10, 0, 0)),
        ("2026-02-12t10:00:00z", utc(2026, 2, 12, 10, 0, 0)),
        ("2026-02-12T10:00:00", utc(2026, 2, 12, 10, 0, 0)),
        ("2026-02-12 10:00:00", utc(2026, 2, 12, 10, 0, 0)),
        ("2026-02-12 10:00:00.5+01:00", utc(2026, 2, 12, 9, 0, 0, 500000)),
        ("2026-02-12T10:00:00+0800", utc(2026, 2, 12, 2, 0, 0)),
        ("2026-02-12T10:00:00-0530", utc(2026, 2, 12, 15, 30, 0)),
        ("2026-02-12T10:00:00+00:00", utc(2026, 2, 12, 10, 0, 0)),
        ("2026-02-12T10:00:00-00:00", utc(2026, 2, 12, 10, 0, 0)),
        ("2026-02-12T10:00:00+23:59", utc(2026, 2, 11, 10, 1, 0)),
        ("2026-02-12T10:00:00-23:59", utc(2026, 2, 13, 9, 59, 0)),
        ("2026-02-12T01:00:00+05:00", utc(2026, 2, 11, 20, 0, 0)),  # crosses the date
        ("2026-02-12T10:00:00.1Z", utc(2026, 2, 12, 10, 0, 0, 100000)),
        ("2026-02-12T10:00:00.1234Z", utc(2026, 2, 12, 10, 0, 0, 123400)),
        ("2026-02-12T10:00:00.123456Z", utc(2026, 2, 12, 10, 0, 0, 123456)),
        ("2026-02-12T10:00:00.000001Z", utc(2026, 2, 12, 10, 0, 0, 1)),
        ("2024-02-29T00:00:00Z", utc(2024, 2, 29)),  # leap day
        ("1969-12-31T23:59:59.999Z", utc(1969, 12, 31, 23, 59, 59, 999000)),
        ("0500-01-01T00:00:00Z", utc(500, 1, 1)),
    ],
)
def test_parse_timestamp_reads_any_writer_as_utc(text, expected):
    value = parse_timestamp(text)
    assert value == expected
    assert value.tzinfo is UTC
    # == across zones would hide a wrong wall clock; compare the fields too.
    assert value.replace(tzinfo=None) == expected.replace(tzinfo=None)


@pytest.mark.parametrize(
    ("fraction", "micro"),
    [
        ("1234564", 123456),
        ("1234565", 123456),  # half: still down (PostgreSQL would round it up)
        ("1234569", 123456),
        ("123456499999", 123456),
        ("123456500000", 123456),
        ("0000004", 0),
        ("0000005", 0),
        ("123456789", 123456),
        ("9999999", 999999),
        ("999999999999", 999999),
        ("000000000000001", 0),
    ],
)
def test_parse_timestamp_truncates_extra_digits_to_the_microsecond(fraction, micro):
    # Go's UnixMilli, pgx and the application's zset scores truncate: rounding
    # could move a message into the next millisecond, away from its score.
    assert parse_timestamp(f"2026-02-12T10:00:00.{fraction}Z").microsecond == micro


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-02-12T10:00:00.9999995Z", utc(2026, 2, 12, 10, 0, 0, 999999)),
        ("2026-02-12T10:00:00.999999999+08:00", utc(2026, 2, 12, 2, 0, 0, 999999)),
        ("2026-02-12T10:59:59.9999999Z", utc(2026, 2, 12, 10, 59, 59, 999999)),
        ("2026-12-31T23:59:59.99999999Z", utc(2026, 12, 31, 23, 59, 59, 999999)),
        ("2026-12-31T23:59:59.9999995+01:00", utc(2026, 12, 31, 22, 59, 59, 999999)),
        ("2024-02-28T23:59:59.9999996Z", utc(2024, 2, 28, 23, 59, 59, 999999)),
        ("2026-02-12 10:00:00.9999995", utc(2026, 2, 12, 10, 0, 0, 999999)),
        # The last representable instant: no carry, so no overflow either.
        ("9999-12-31T23:59:59.9999995Z", utc(9999, 12, 31, 23, 59, 59, 999999)),
        ("9999-12-31T23:59:59.9999995+00:00", utc(9999, 12, 31, 23, 59, 59, 999999)),
    ],
)
def test_parse_timestamp_never_carries_into_the_next_second(text, expected):
    value = parse_timestamp(text)
    assert value == expected
    assert value.replace(tzinfo=None) == expected.replace(tzinfo=None)


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-12",  # date only
        "10:00:00",  # time only
        "2026W01",  # week date
        "2026-W07-4T10:00:00Z",
        "2026-043T10:00:00Z",  # ordinal date
        "garbage",
        "",
        " 2026-02-12T10:00:00Z",
        "2026-02-12T10:00:00Z ",
        "2026-02-12T10:00Z",  # no seconds
        "2026-02-12T10:00:00.",  # empty fraction
        "2026-02-12T10:00:00,5Z",  # comma fraction
        "20260212T100000Z",  # basic format
        "2026-2-12T10:00:00Z",
        "2026-02-12T10:00:00+08",  # hour-only offset
        "2026-02-12T10:00:00+8:00",
        "2026-02-12T10:00:00ZZ",
        "2026-02-12T10:00:00 UTC",
        "12026-02-12T10:00:00Z",
        "1770861600123",  # epoch milliseconds as text
    ],
)
def test_parse_timestamp_rejects_what_is_not_rfc3339(text):
    with pytest.raises(RecordRejected, match="not an RFC 3339 timestamp"):
        parse_timestamp(text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-13-01T00:00:00Z",  # month 13
        "2026-00-10T00:00:00Z",
        "2026-02-30T00:00:00Z",  # Feb 30
        "2025-02-29T00:00:00Z",  # not a leap year
        "2026-04-31T00:00:00Z",
        "2026-02-12T25:00:00Z",
        "2026-02-12T10:60:00Z",
        "2026-02-12T23:59:60Z",  # leap second: PostgreSQL and Python cannot hold it
        "0000-01-01T00:00:00Z",
        # The same invalid dates down the slow path (space, nanoseconds, +hhmm).
        "2026-13-01 00:00:00",
        "2026-02-30T00:00:00.123456789Z",
        "2026-02-30T00:00:00+0100",
    ],
)
def test_parse_timestamp_rejects_impossible_dates_and_times(text):
    with pytest.raises(RecordRejected, match="not a valid date/time"):
        parse_timestamp(text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-12T10:00:00+25:00",
        "2026-02-12T10:00:00+24:00",
        "2026-02-12T10:00:00-24:00",
        "2026-02-12T10:00:00+2500",
        "2026-02-12T10:00:00+08:60",  # fromisoformat alone would read this as +09:00
        "2026-02-12T10:00:00+0860",
        "2026-02-12T10:00:00.123456789+25:00",
        "2026-02-12 10:00:00+99:99",
    ],
)
def test_parse_timestamp_rejects_impossible_offsets(text):
    with pytest.raises(RecordRejected) as info:
        parse_timestamp(text)
    assert "offset" in info.value.reason or "not a valid date/time" in info.value.reason


@pytest.mark.parametrize(
    "text",
    [
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59.999999999-00:01",
        "0001-01-01T00:30:00.123456789+0100",
    ],
)
def test_parse_timestamp_rejects_instants_outside_the_representable_range(text):
    with pytest.raises(RecordRejected, match="out of range"):
        parse_timestamp(text)


# Other scripts' digits: int() reads them, RFC 3339 does not allow them.
ARABIC_INDIC = str.maketrans("0123456789", "".join(chr(0x660 + n) for n in range(10)))
FULL_WIDTH = str.maketrans("0123456789", "".join(chr(0xFF10 + n) for n in range(10)))


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-12T10:00:00Z".translate(ARABIC_INDIC),
        "2026-02-12 10:00:00Z".translate(ARABIC_INDIC),  # the slow path
        "2026-02-12T10:00:00.123456789Z".translate(ARABIC_INDIC),
        "2026-02-12T10:00:00.12345678" + "9".translate(ARABIC_INDIC) + "Z",
        "2026-02-12T10:00:00." + "12".translate(FULL_WIDTH) + "Z",
        "2026-02-12T10:00:00+" + "08".translate(ARABIC_INDIC) + "00",
    ],
)
def test_parse_timestamp_accepts_only_ascii_digits(text):
    with pytest.raises(RecordRejected):
        parse_timestamp(text)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (1770861600123, "number"),
        (1.5, "number"),
        (None, "null"),
        (True, "boolean"),
        (["2026-02-12T10:00:00Z"], "array"),
        ({"t": "2026-02-12T10:00:00Z"}, "object"),
        (b"2026-02-12T10:00:00Z", "bytes"),
    ],
)
def test_parse_timestamp_rejects_non_strings_naming_the_type(value, type_name):
    with pytest.raises(RecordRejected, match=f"must be a string \\(got {type_name}\\)"):
        parse_timestamp(value)


def test_parse_timestamp_reason_names_the_field_and_the_value():
    with pytest.raises(RecordRejected) as info:
        parse_timestamp("yesterday", "message created_at")
    assert info.value.reason.startswith("message created_at ")
    assert "'yesterday'" in info.value.reason
    assert str(info.value) == info.value.reason


def test_parse_timestamp_clips_a_huge_value_in_its_reason():
    with pytest.raises(RecordRejected) as info:
        parse_timestamp("x" * 10_000)
    assert len(info.value.reason) < 200


def test_record_rejected_is_a_value_error():
    assert issubclass(RecordRejected, ValueError)


# -- format_timestamp --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (utc(2026, 2, 12, 2, 0, 0, 123457), "2026-02-12T02:00:00.123457Z"),
        (utc(2026, 2, 12, 2, 0, 0), "2026-02-12T02:00:00.000000Z"),
        (utc(2026, 2, 12, 2, 0, 0, 1), "2026-02-12T02:00:00.000001Z"),
        (
            datetime(2026, 2, 12, 10, 0, tzinfo=timezone(timedelta(hours=8))),
            "2026-02-12T02:00:00.000000Z",
        ),
        (
            datetime(2026, 2, 11, 23, 30, tzinfo=timezone(timedelta(hours=-3))),
            "2026-02-12T02:30:00.000000Z",
        ),
        (utc(1969, 7, 20, 20, 17, 40), "1969-07-20T20:17:40.000000Z"),
        (utc(500, 1, 1), "0500-01-01T00:00:00.000000Z"),  # four-digit year, always
        (utc(1, 1, 1), "0001-01-01T00:00:00.000000Z"),
    ],
)
def test_format_timestamp_writes_rfc3339_utc_with_microseconds(value, text):
    assert format_timestamp(value) == text


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-12T10:00:00.123456789+08:00",
        "2026-02-12T10:00:00Z",
        "1969-12-31T23:59:59.999999Z",
        "0999-06-01T12:00:00.5-02:00",
        "9999-12-31T23:59:59.999999Z",
    ],
)
def test_format_timestamp_reads_back_to_the_same_instant(text):
    value = parse_timestamp(text)
    assert parse_timestamp(format_timestamp(value)) == value


# -- epoch_ms ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (utc(1970, 1, 1), 0),
        (utc(1970, 1, 1, 0, 0, 0, 999), 0),
        (utc(1970, 1, 1, 0, 0, 0, 1000), 1),
        (utc(1970, 1, 1, 0, 0, 1), 1000),
        (utc(2026, 2, 12, 2, 0, 0, 123457), 1_770_861_600_123),
        (utc(2026, 2, 12, 2, 0, 0, 123999), 1_770_861_600_123),  # floor, not round
        # Before 1970 the floor goes down, as Go's UnixMilli does.
        (utc(1969, 12, 31, 23, 59, 59, 999500), -1),
        (utc(1969, 12, 31, 23, 59, 59, 999000), -1),
        (utc(1969, 12, 31, 23, 59, 59, 998999), -2),
        (utc(1969, 12, 31, 23, 59, 59), -1000),
        (utc(1969, 7, 20, 20, 17, 40), -14_182_940_000),
    ],
)
def test_epoch_ms_is_the_floor_of_unix_milliseconds(value, ms):
    assert epoch_ms(value) == ms


def test_epoch_ms_ignores_the_zone_the_instant_is_written_in():
    tokyo = timezone(timedelta(hours=9))
    assert epoch_ms(datetime(2026, 2, 12, 11, 0, tzinfo=tokyo)) == epoch_ms(utc(2026, 2, 12, 2))


def test_epoch_ms_of_a_go_timestamp():
    assert epoch_ms(parse_timestamp("2026-02-12T10:00:00.123456789+08:00")) == 1_770_861_600_123


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2026-02-12T10:00:00.999999999+08:00", 1_770_861_600_999),
        ("2026-02-12T10:00:00.9995Z", 1_770_890_400_999),
        ("2026-02-12T10:00:00.0009999999Z", 1_770_890_400_000),
        ("1969-12-31T23:59:59.9999999Z", -1),
    ],
)
def test_epoch_ms_of_a_parsed_timestamp_is_the_score_the_application_wrote(text, ms):
    # The application scores a message with the truncated epoch milliseconds of
    # its created_at; a restore scores it from the parsed value: they must agree.
    assert epoch_ms(parse_timestamp(text)) == ms


def test_epoch_ms_agrees_with_timestamp_at_whole_milliseconds():
    value = utc(2031, 5, 6, 7, 8, 9, 10_000)
    assert epoch_ms(value) == round(value.timestamp() * 1000)
