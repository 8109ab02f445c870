//! Logging through `log` or `defmt`, behind the features of those names; without either the
//! SDK is silent and the arguments cost nothing. Arguments are kept to what both accept: text,
//! numbers and bools. (Some are used only under some features.)

#[allow(unused_macros)]
macro_rules! log_at {
    ($level:ident, $fmt:literal $(, $arg:expr)* $(,)?) => {{
        #[cfg(feature = "log")]
        ::log::$level!($fmt $(, $arg)*);
        #[cfg(feature = "defmt")]
        ::defmt::$level!($fmt $(, $arg)*);
        #[cfg(not(any(feature = "log", feature = "defmt")))]
        {
            $( let _ = &$arg; )*
        }
    }};
}

#[allow(unused_macros)]
macro_rules! log_info {
    ($($t:tt)*) => { log_at!(info, $($t)*) };
}

#[allow(unused_macros)]
macro_rules! log_warn {
    ($($t:tt)*) => { log_at!(warn, $($t)*) };
}

#[allow(unused_macros)]
macro_rules! log_debug {
    ($($t:tt)*) => { log_at!(debug, $($t)*) };
}
