//! Where ferry's per-user files live, by the XDG Base Directory specification: `$XDG_CONFIG_HOME/ferry` and
//! `$XDG_STATE_HOME/ferry`, else `$HOME/.config/ferry` and `$HOME/.local/state/ferry`. A variable that is unset,
//! empty or relative is ignored (the specification: "If an implementation encounters a relative path in any of
//! these variables it should consider the path invalid and ignore it"), and so is an empty or relative `$HOME`;
//! with neither usable there is no default, never a directory relative to wherever ferry was started.

use std::ffi::OsString;
use std::path::PathBuf;

use thiserror::Error;

/// A kind of per-user directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseDir {
    /// Configuration (`$XDG_CONFIG_HOME`, `~/.config`).
    Config,
    /// State that should persist between runs (`$XDG_STATE_HOME`, `~/.local/state`).
    State,
}

impl BaseDir {
    fn variable(self) -> &'static str {
        match self {
            BaseDir::Config => "XDG_CONFIG_HOME",
            BaseDir::State => "XDG_STATE_HOME",
        }
    }

    fn under_home(self) -> &'static str {
        match self {
            BaseDir::Config => ".config",
            BaseDir::State => ".local/state",
        }
    }
}

/// Neither the XDG variable nor `$HOME` gives a usable (non-empty, absolute) directory.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "no {what} directory: ${variable} is {variable_is} and $HOME is {home_is}; set one of them to an absolute \
     path, or name the directory explicitly{hint}"
)]
pub struct NoBaseDir {
    what: &'static str,
    variable: &'static str,
    variable_is: &'static str,
    home_is: &'static str,
    hint: &'static str,
}

/// `ferry`'s directory of `kind` from the process environment: `$XDG_…/ferry`, else `$HOME/…/ferry`.
pub fn ferry_dir(kind: BaseDir) -> Result<PathBuf, NoBaseDir> {
    resolve(kind, std::env::var_os(kind.variable()), std::env::var_os("HOME"))
}

/// [`ferry_dir`] over given values of the XDG variable and `$HOME` (testable without touching the environment).
pub fn resolve(kind: BaseDir, variable: Option<OsString>, home: Option<OsString>) -> Result<PathBuf, NoBaseDir> {
    if let Some(dir) = usable(&variable) {
        return Ok(dir.join("ferry"));
    }
    if let Some(home) = usable(&home) {
        return Ok(home.join(kind.under_home()).join("ferry"));
    }
    Err(NoBaseDir {
        what: match kind {
            BaseDir::Config => "configuration",
            BaseDir::State => "state",
        },
        variable: kind.variable(),
        variable_is: describe(&variable),
        home_is: describe(&home),
        hint: match kind {
            BaseDir::Config => " (--client-config or $FERRY_CONFIG)",
            BaseDir::State => " (--state or $FERRY_STATE)",
        },
    })
}

fn usable(value: &Option<OsString>) -> Option<PathBuf> {
    value
        .as_ref()
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty() && p.is_absolute())
}

fn describe(value: &Option<OsString>) -> &'static str {
    match value {
        None => "unset",
        Some(v) if v.is_empty() => "empty",
        Some(_) => "relative",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(s.into())
    }

    #[test]
    fn an_absolute_variable_wins_and_empty_or_relative_ones_fall_back_to_home() {
        assert_eq!(
            resolve(BaseDir::State, os("/x/state"), os("/home/u")),
            Ok(PathBuf::from("/x/state/ferry"))
        );
        for ignored in [None, os(""), os("relative/state"), os("./s")] {
            assert_eq!(
                resolve(BaseDir::State, ignored.clone(), os("/home/u")),
                Ok(PathBuf::from("/home/u/.local/state/ferry")),
                "{ignored:?}"
            );
            assert_eq!(
                resolve(BaseDir::Config, ignored, os("/home/u")),
                Ok(PathBuf::from("/home/u/.config/ferry"))
            );
        }
    }

    #[test]
    fn without_a_usable_variable_or_home_there_is_a_clear_error_not_the_current_directory() {
        for home in [None, os(""), os("relative-home")] {
            let error = resolve(BaseDir::State, os("rel"), home.clone()).unwrap_err();
            let text = error.to_string();
            assert!(text.contains("$XDG_STATE_HOME is relative"), "{text}");
            assert!(text.contains("--state"), "{text}");
            assert!(text.contains(describe(&home)), "{text}");
        }
        let error = resolve(BaseDir::Config, None, None).unwrap_err().to_string();
        assert!(
            error.contains("$XDG_CONFIG_HOME is unset and $HOME is unset"),
            "{error}"
        );
    }
}
