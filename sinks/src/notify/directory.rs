//! The recipients: every user's addresses and push devices, loaded from Postgres at start and
//! kept current by the CDC source (`users`, `user_devices`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use schemas::{Contact, Device};
use sqlx::PgPool;

use super::Channel;

/// The recipients of alerts on the personal channels; cloned handles share one book. The
/// ingest front applies `users` / `user_devices` changes as they arrive; the notify sink
/// resolves each alert's recipients here.
#[derive(Clone, Default)]
pub struct Directory(Arc<RwLock<Book>>);

/// `users` (id, email, telegram_chat_id, discord_webhook_url).
type UserRow = (String, Option<String>, Option<String>, Option<String>);

#[derive(Default)]
struct Book {
    users: HashMap<String, Contact>,
    /// Devices by `user_devices.id`.
    devices: HashMap<String, Device>,
    /// Each user's device ids.
    by_user: HashMap<String, BTreeSet<String>>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (users, devices) = self.len();
        f.debug_struct("Directory")
            .field("users", &users)
            .field("devices", &devices)
            .finish()
    }
}

impl Directory {
    /// Reads every row of `users` and `user_devices` (replacing what is held); returns the
    /// numbers of users and devices.
    pub async fn load(&self, pool: &PgPool) -> Result<(usize, usize), sqlx::Error> {
        let users: Vec<UserRow> = sqlx::query_as("SELECT id, email, telegram_chat_id, discord_webhook_url FROM users")
            .fetch_all(pool)
            .await?;
        let devices: Vec<(String, String, String, String)> =
            sqlx::query_as("SELECT id, user_id, device_token, platform FROM user_devices")
                .fetch_all(pool)
                .await?;
        let mut book = Book::default();
        let blank = |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        for (user_id, email, telegram, discord) in users {
            book.set_user(Contact {
                user_id,
                email: blank(email),
                telegram_chat_id: blank(telegram),
                discord_webhook_url: blank(discord),
            });
        }
        for (id, user_id, token, platform) in devices {
            book.set_device(Device {
                id,
                user_id,
                token,
                platform,
            });
        }
        let counts = (book.users.len(), book.devices.len());
        *self.write() = book;
        self.gauges(counts);
        Ok(counts)
    }

    /// A user was added or changed.
    pub fn set_user(&self, contact: Contact) {
        self.update(|b| b.set_user(contact));
    }

    /// A user was deleted (their devices stay until deleted themselves).
    pub fn remove_user(&self, user_id: &str) {
        self.update(|b| {
            b.users.remove(user_id);
        });
    }

    /// A device was added or changed.
    pub fn set_device(&self, device: Device) {
        self.update(|b| b.set_device(device));
    }

    /// A device was deleted, by its id.
    pub fn remove_device(&self, id: &str) {
        self.update(|b| b.remove_device(id));
    }

    /// Forgets every device holding `token` (the push service reported it unregistered).
    pub fn remove_token(&self, token: &str) {
        self.update(|b| {
            let ids: Vec<String> = b
                .devices
                .values()
                .filter(|d| d.token == token)
                .map(|d| d.id.clone())
                .collect();
            for id in ids {
                b.remove_device(&id);
            }
        });
    }

    /// Applies `change` to the book, then sets the gauges.
    fn update(&self, change: impl FnOnce(&mut Book)) {
        let counts = {
            let mut b = self.write();
            change(&mut b);
            (b.users.len(), b.devices.len())
        };
        self.gauges(counts);
    }

    /// How many users and devices are held.
    pub fn len(&self) -> (usize, usize) {
        let b = self.read();
        (b.users.len(), b.devices.len())
    }

    /// Whether nobody is known.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// The addresses of `user_id` on `channel` (push: every device token, in device-id
    /// order); `Err` says what is missing, for the dead letter.
    pub fn recipients(&self, user_id: &str, channel: Channel) -> Result<Vec<String>, String> {
        let b = self.read();
        let missing = |what: &str| Err(format!("user {user_id:?} has no {what} for the {channel} channel"));
        if channel == Channel::Push {
            let tokens: Vec<String> = b
                .by_user
                .get(user_id)
                .into_iter()
                .flatten()
                .filter_map(|id| b.devices.get(id).map(|d| d.token.clone()))
                .collect();
            return if tokens.is_empty() {
                missing("device in user_devices")
            } else {
                Ok(tokens)
            };
        }
        let Some(user) = b.users.get(user_id) else {
            return Err(format!(
                "user {user_id:?} is not in the users table ({channel} channel)"
            ));
        };
        let address = match channel {
            Channel::Email => user.email.clone(),
            Channel::Telegram => user.telegram_chat_id.clone(),
            Channel::Discord => user.discord_webhook_url.clone(),
            Channel::Push => None,
        };
        match address {
            Some(a) => Ok(vec![a]),
            None => missing(match channel {
                Channel::Email => "email",
                Channel::Telegram => "telegram_chat_id",
                _ => "discord_webhook_url",
            }),
        }
    }

    fn gauges(&self, (users, devices): (usize, usize)) {
        metrics::gauge!("llamaflow_notify_recipients", "kind" => "users").set(users as f64);
        metrics::gauge!("llamaflow_notify_recipients", "kind" => "devices").set(devices as f64);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Book> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Book> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Book {
    fn set_user(&mut self, c: Contact) {
        self.users.insert(c.user_id.clone(), c);
    }

    fn set_device(&mut self, d: Device) {
        self.remove_device(&d.id);
        self.by_user.entry(d.user_id.clone()).or_default().insert(d.id.clone());
        self.devices.insert(d.id.clone(), d);
    }

    fn remove_device(&mut self, id: &str) {
        if let Some(old) = self.devices.remove(id)
            && let Some(ids) = self.by_user.get_mut(&old.user_id)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.by_user.remove(&old.user_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, user: &str, token: &str) -> Device {
        Device {
            id: id.into(),
            user_id: user.into(),
            token: token.into(),
            platform: "android".into(),
        }
    }

    #[test]
    fn recipients_follow_changes_and_say_what_is_missing() {
        let d = Directory::default();
        let err = d.recipients("u1", Channel::Email).unwrap_err();
        assert!(err.contains("not in the users table"), "{err}");
        d.set_user(Contact {
            user_id: "u1".into(),
            email: Some("a@example.com".into()),
            ..Contact::default()
        });
        assert_eq!(d.recipients("u1", Channel::Email).unwrap(), vec!["a@example.com"]);
        let err = d.recipients("u1", Channel::Telegram).unwrap_err();
        assert!(err.contains("telegram_chat_id"), "{err}");
        assert!(d.recipients("u1", Channel::Push).unwrap_err().contains("device"));
        d.set_device(device("d2", "u1", "tok-b"));
        d.set_device(device("d1", "u1", "tok-a"));
        assert_eq!(d.recipients("u1", Channel::Push).unwrap(), vec!["tok-a", "tok-b"]);
        // A device moving to another user leaves the first.
        d.set_device(device("d2", "u2", "tok-b"));
        assert_eq!(d.recipients("u1", Channel::Push).unwrap(), vec!["tok-a"]);
        assert_eq!(d.recipients("u2", Channel::Push).unwrap(), vec!["tok-b"]);
        d.remove_token("tok-a");
        assert!(d.recipients("u1", Channel::Push).is_err());
        d.remove_device("d2");
        assert_eq!(d.len(), (1, 0));
        d.remove_user("u1");
        assert!(d.is_empty());
    }
}
