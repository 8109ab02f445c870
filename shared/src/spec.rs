//! Thing-model rules without a heap: what a value of each TSL data type must be.
//!
//! The cloud's thing model ([`crate::tsl`], with `alloc`) checks reported values with these
//! functions, and firmware describes its own model as `static` tables of [`Spec`] checked by
//! the same functions, so a value one side accepts the other accepts too. Nesting is what the
//! TSL allows: structs of scalars, arrays of scalars or structs.

/// Why a value does not fit its data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misfit {
    /// Not the JSON kind the type needs (e.g. text for an int).
    WrongKind,
    /// Below `min` or above `max`.
    OutOfRange,
    /// Not `min` plus a multiple of `step`.
    OffStep,
    /// Text longer than the type's length.
    TooLong,
    /// An enum code the type does not list.
    UnknownCode,
    /// A struct field the type does not have.
    UnknownField,
    /// More array items than the type's size.
    TooManyItems,
}

impl Misfit {
    /// A short English reason, for replies and logs.
    pub const fn reason(self) -> &'static str {
        match self {
            Misfit::WrongKind => "wrong type",
            Misfit::OutOfRange => "out of range",
            Misfit::OffStep => "not on a step",
            Misfit::TooLong => "text too long",
            Misfit::UnknownCode => "unknown enum code",
            Misfit::UnknownField => "unknown struct field",
            Misfit::TooManyItems => "too many array items",
        }
    }
}

/// A data type with the specs that constrain its values, borrowing its lists so that it can
/// live in a `static`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spec<'a> {
    /// 32-bit integer (`int`).
    Int {
        /// Inclusive bounds.
        min: i64,
        /// Inclusive bounds.
        max: i64,
        /// Values are `min + k * step`.
        step: Option<i64>,
    },
    /// `float` or `double`.
    Real {
        /// Inclusive bounds.
        min: f64,
        /// Inclusive bounds.
        max: f64,
        /// Values are `min + k * step` (within 1e-6 of a step).
        step: Option<f64>,
    },
    /// UTF-8 text of at most `length` bytes.
    Text {
        /// Longest accepted value, in bytes.
        length: usize,
    },
    /// Integer codes.
    Enum {
        /// The accepted codes.
        codes: &'a [i64],
    },
    /// 0 or 1 (`true`/`false` accepted too).
    Bool,
    /// UTC milliseconds, as digits or a non-negative number.
    Date,
    /// Named scalar fields.
    Struct {
        /// The fields.
        fields: &'a [Field<'a>],
    },
    /// Up to `size` items of one type.
    Array {
        /// Most items.
        size: usize,
        /// The items' type.
        item: &'a Spec<'a>,
    },
}

/// A named, typed field: a property, a struct field, a service input or output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field<'a> {
    /// Identifier.
    pub identifier: &'a str,
    /// Type and specs.
    pub spec: Spec<'a>,
}

/// An integer within `[min, max]` and on a step.
pub fn check_int(n: i64, min: i64, max: i64, step: Option<i64>) -> Result<(), Misfit> {
    if n < min || n > max {
        return Err(Misfit::OutOfRange);
    }
    let on_step =
        step.is_none_or(|s| s == 0 || (n as i128 - min as i128).rem_euclid(s as i128) == 0);
    if on_step {
        Ok(())
    } else {
        Err(Misfit::OffStep)
    }
}

/// A number within `[min, max]` and within 1e-6 of a step.
pub fn check_real(x: f64, min: f64, max: f64, step: Option<f64>) -> Result<(), Misfit> {
    if !x.is_finite() {
        return Err(Misfit::WrongKind);
    }
    if x < min || x > max {
        return Err(Misfit::OutOfRange);
    }
    let on_step = step.is_none_or(|s| {
        if s <= 0.0 {
            return true;
        }
        let k = (x - min) / s;
        (k - round(k)).abs() < 1e-6
    });
    if on_step {
        Ok(())
    } else {
        Err(Misfit::OffStep)
    }
}

/// `f64::round` is not in `core`; this is enough for step checks.
fn round(x: f64) -> f64 {
    let t = x as i64 as f64;
    if (x - t).abs() >= 0.5 {
        t + x.signum()
    } else {
        t
    }
}

/// Text of at most `length` bytes.
pub fn check_text(len: usize, length: usize) -> Result<(), Misfit> {
    if len > length {
        Err(Misfit::TooLong)
    } else {
        Ok(())
    }
}

/// A date given as text: 1 to 19 ASCII digits.
pub fn check_date_text(s: &str) -> Result<(), Misfit> {
    if !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(Misfit::WrongKind)
    }
}

/// A bool given as a number: 0 or 1.
pub fn check_bool_int(n: i64) -> Result<(), Misfit> {
    if n == 0 || n == 1 {
        Ok(())
    } else {
        Err(Misfit::WrongKind)
    }
}

/// An array of `len` items where at most `size` are allowed.
pub fn check_items(len: usize, size: usize) -> Result<(), Misfit> {
    if len > size {
        Err(Misfit::TooManyItems)
    } else {
        Ok(())
    }
}

impl Spec<'_> {
    /// Checks an integer value (also how JSON integers reach `Real`, `Bool`, `Date`, `Enum`).
    pub fn check_i64(&self, n: i64) -> Result<(), Misfit> {
        match *self {
            Spec::Int { min, max, step } => check_int(n, min, max, step),
            Spec::Real { min, max, step } => check_real(n as f64, min, max, step),
            Spec::Enum { codes } => {
                if codes.contains(&n) {
                    Ok(())
                } else {
                    Err(Misfit::UnknownCode)
                }
            }
            Spec::Bool => check_bool_int(n),
            Spec::Date if n >= 0 => Ok(()),
            _ => Err(Misfit::WrongKind),
        }
    }

    /// Checks a number with a fraction or exponent (only `Real` takes one).
    pub fn check_f64(&self, x: f64) -> Result<(), Misfit> {
        match *self {
            Spec::Real { min, max, step } => check_real(x, min, max, step),
            _ => Err(Misfit::WrongKind),
        }
    }

    /// Checks text of `len` bytes whose content is `s` when it has no escapes (a date needs
    /// its digits; escaped text is never a valid date).
    pub fn check_text(&self, len: usize, s: Option<&str>) -> Result<(), Misfit> {
        match *self {
            Spec::Text { length } => check_text(len, length),
            Spec::Date => s.map_or(Err(Misfit::WrongKind), check_date_text),
            _ => Err(Misfit::WrongKind),
        }
    }

    /// Checks a JSON `true`/`false`.
    pub fn check_bool(&self) -> Result<(), Misfit> {
        match self {
            Spec::Bool => Ok(()),
            _ => Err(Misfit::WrongKind),
        }
    }

    /// The field of a struct type with this identifier.
    pub fn field(&self, identifier: &str) -> Result<&Field<'_>, Misfit> {
        match self {
            Spec::Struct { fields } => fields
                .iter()
                .find(|f| f.identifier == identifier)
                .ok_or(Misfit::UnknownField),
            _ => Err(Misfit::WrongKind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_follow_the_thing_model_rules() {
        assert_eq!(check_int(5, 0, 10, Some(5)), Ok(()));
        assert_eq!(check_int(6, 0, 10, Some(5)), Err(Misfit::OffStep));
        assert_eq!(check_int(-5, -10, 10, Some(5)), Ok(()));
        assert_eq!(check_int(11, 0, 10, None), Err(Misfit::OutOfRange));
        assert_eq!(check_int(i64::MAX, i64::MIN, i64::MAX, Some(3)), Ok(()));
        assert_eq!(check_real(0.3, 0.0, 1.0, Some(0.1)), Ok(()));
        assert_eq!(check_real(0.35, 0.0, 1.0, Some(0.1)), Err(Misfit::OffStep));
        assert_eq!(check_real(f64::NAN, 0.0, 1.0, None), Err(Misfit::WrongKind));
        assert_eq!(check_date_text("1700000000000"), Ok(()));
        assert_eq!(check_date_text("17e11"), Err(Misfit::WrongKind));
        static CODES: [i64; 2] = [0, 2];
        let e = Spec::Enum { codes: &CODES };
        assert_eq!(e.check_i64(2), Ok(()));
        assert_eq!(e.check_i64(1), Err(Misfit::UnknownCode));
        assert_eq!(Spec::Bool.check_i64(1), Ok(()));
        assert_eq!(Spec::Bool.check_i64(2), Err(Misfit::WrongKind));
        assert_eq!(
            Spec::Text { length: 3 }.check_text(4, None),
            Err(Misfit::TooLong)
        );
        assert_eq!(Spec::Date.check_text(2, Some("12")), Ok(()));
        assert_eq!(Spec::Date.check_text(2, None), Err(Misfit::WrongKind));
    }
}
