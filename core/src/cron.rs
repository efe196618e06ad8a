//! Cron expressions of five fields (minute, hour, day of month, month, day of week), in UTC,
//! as `[[schedule]] cron` takes them: `*`, numbers, ranges `a-b`, lists `a,b`, steps `*/n` and
//! `a-b/n`; day of week 0–7 with 0 and 7 both Sunday; month and day names are not taken. As in
//! Vixie cron, when both day fields are restricted a day matching either one matches.

use std::fmt;

/// A parsed expression: each field as the set of values it allows.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Both day fields are restricted (not `*`): a day matches if either does.
    either_day: bool,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cron({:?})", self.text)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The fields' names and bounds, in order.
const FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
];

impl std::str::FromStr for Cron {
    type Err = String;

    fn from_str(text: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "`{text}` has {} fields; a cron expression has five: minute hour day-of-month month day-of-week, such as \"0 * * * *\" for every hour",
                fields.len()
            ));
        }
        let mut sets = [0u64; 5];
        for (index, (field, (name, low, high))) in fields.iter().zip(FIELDS).enumerate() {
            sets[index] = field_set(field, low, high)
                .map_err(|why| format!("`{text}`: the {name} field `{field}` {why}"))?;
        }
        // Sunday is 0 and 7.
        if sets[4] & (1 << 7) != 0 {
            sets[4] = (sets[4] | 1) & !(1 << 7);
        }
        Ok(Cron {
            text: fields.join(" "),
            minutes: sets[0],
            hours: sets[1],
            days: sets[2],
            months: sets[3],
            weekdays: sets[4],
            // As in Vixie cron: a day field starting with `*` (`*`, `*/2`) counts as
            // unrestricted here.
            either_day: !fields[2].starts_with('*') && !fields[4].starts_with('*'),
        })
    }
}

/// The values one field allows, as bits.
fn field_set(field: &str, low: u32, high: u32) -> Result<u64, String> {
    let mut set = 0u64;
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .map_err(|_| format!("has a step `{step}` that is not a number"))?;
                if step == 0 {
                    return Err("has a step of 0".into());
                }
                (range, step)
            }
            None => (part, 1),
        };
        let number = |text: &str| -> Result<u32, String> {
            let value: u32 = text
                .parse()
                .map_err(|_| format!("holds `{text}`, which is not a number"))?;
            if value < low || value > high {
                return Err(format!("holds {value}, outside {low}–{high}"));
            }
            Ok(value)
        };
        let (from, to) = match range {
            "*" => (low, high),
            _ => match range.split_once('-') {
                Some((from, to)) => (number(from)?, number(to)?),
                // `N/s` is `N-high/s`, whatever the step.
                None if part.contains('/') => (number(range)?, high),
                None => {
                    let value = number(range)?;
                    (value, value)
                }
            },
        };
        if from > to {
            return Err(format!("has a range {from}-{to} that runs backwards"));
        }
        let mut value = from;
        while value <= to {
            set |= 1 << value;
            match value.checked_add(step) {
                Some(next) => value = next,
                None => break,
            }
        }
    }
    Ok(set)
}

impl Cron {
    /// The first minute strictly after `after` (Unix seconds, UTC) that the expression
    /// matches, as Unix seconds. `None` only for a date that never comes (such as 30 February)
    /// within the next eight years.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        let mut minute = after.div_euclid(60) + 1;
        let limit = minute + 8 * 366 * 24 * 60;
        while minute < limit {
            let (days, minute_of_day) = (minute.div_euclid(1440), minute.rem_euclid(1440));
            let (_, month, day) = civil_from_days(days);
            // Sunday is 0; 1970-01-01 was a Thursday.
            let weekday = (days + 4).rem_euclid(7) as u32;
            if self.months & (1 << month) == 0 {
                // Skip to the first day of the next month.
                let (year, month, _) = civil_from_days(days);
                let (year, month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                minute = days_from_civil(year, month, 1) * 1440;
                continue;
            }
            let day_of_month = self.days & (1 << day) != 0;
            let day_of_week = self.weekdays & (1 << weekday) != 0;
            let day_matches = if self.either_day {
                day_of_month || day_of_week
            } else {
                day_of_month && day_of_week
            };
            if !day_matches {
                minute = (days + 1) * 1440;
                continue;
            }
            let hour = (minute_of_day / 60) as u32;
            if self.hours & (1 << hour) == 0 {
                minute = days * 1440 + (hour as i64 + 1) * 60;
                continue;
            }
            if self.minutes & (1 << (minute_of_day % 60)) != 0 {
                return Some(minute * 60);
            }
            minute += 1;
        }
        None
    }
}

/// Year, month (1–12) and day (1–31) of a day number (days since 1970-01-01), after Howard
/// Hinnant's published `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The day number of a date, the inverse of `civil_from_days`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = month as i64;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(year: i64, month: u32, day: u32, hour: i64, minute: i64) -> i64 {
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60
    }

    fn next(cron: &str, after: i64) -> i64 {
        cron.parse::<Cron>().unwrap().next_after(after).unwrap()
    }

    #[test]
    fn dates_convert_both_ways() {
        for days in [-1_000_000, -1, 0, 59, 365, 11_016, 19_782, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn next_times_follow_each_field() {
        let t = at(2026, 12, 3, 17, 1) + 30;
        assert_eq!(next("* * * * *", t), at(2026, 12, 3, 17, 2));
        assert_eq!(next("0 * * * *", t), at(2026, 12, 3, 18, 0));
        assert_eq!(next("*/15 * * * *", t), at(2026, 12, 3, 17, 15));
        assert_eq!(next("30 2 * * *", t), at(2026, 12, 4, 2, 30));
        assert_eq!(next("0 0 1 * *", t), at(2027, 1, 1, 0, 0));
        assert_eq!(next("0 9 * * 1-5", t), at(2026, 12, 4, 9, 0)); // a Friday
        assert_eq!(next("0 9 * * 0", t), at(2026, 12, 6, 9, 0)); // Sunday
        assert_eq!(next("0 9 * * 7", t), at(2026, 12, 6, 9, 0));
        assert_eq!(next("0 0 29 2 *", t), at(2028, 2, 29, 0, 0));
        assert_eq!(next("5,10 8-9 * 6 *", t), at(2027, 6, 1, 8, 5));
        // Both day fields restricted: either matches (the 13th, or any Friday).
        assert_eq!(next("0 0 13 * 5", t), at(2026, 12, 4, 0, 0));
        // A day field starting with `*` counts as unrestricted: every other day AND Monday.
        assert_eq!(next("0 0 */2 * 1", t), at(2026, 12, 7, 0, 0));
        // `N/s` runs from N to the end, for any step.
        assert_eq!(next("50/1 * * * *", t), at(2026, 12, 3, 17, 50));
        assert_eq!(next("58/4294967295 * * * *", t), at(2026, 12, 3, 17, 58));
        // Strictly after: on the minute itself, the next one.
        assert_eq!(
            next("0 * * * *", at(2026, 12, 3, 18, 0)),
            at(2026, 12, 3, 19, 0)
        );
        assert_eq!("0 0 30 2 *".parse::<Cron>().unwrap().next_after(t), None);
    }

    #[test]
    fn bad_expressions_say_which_field() {
        for (text, said) in [
            ("* * * *", "has 4 fields"),
            ("60 * * * *", "the minute field `60` holds 60, outside 0–59"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day of month field"),
            ("* * * 13 *", "month field"),
            ("* * * * 8", "day of week field"),
            ("*/0 * * * *", "step of 0"),
            ("5-1 * * * *", "runs backwards"),
            ("a * * * *", "not a number"),
            ("* * * JAN *", "not a number"),
        ] {
            let error = text.parse::<Cron>().unwrap_err();
            assert!(error.contains(said), "{text}: {error}");
        }
    }
}
