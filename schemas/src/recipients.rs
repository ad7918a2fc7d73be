//! Who receives alerts on the personal channels (email, Telegram, Discord, push): the rows of
//! `users` and `user_devices` (SPEC §6), as read by the CDC source and kept by the notifier.

use serde::{Deserialize, Serialize};

/// A user's addresses (a `users` row): each `None` when the user has not given it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// `users.id`, the rules' `user_id`.
    pub user_id: String,
    /// Address for the `email` channel.
    pub email: Option<String>,
    /// Chat id for the `telegram` channel (a number, or `@channelname`).
    pub telegram_chat_id: Option<String>,
    /// Discord webhook URL for the `discord` channel.
    pub discord_webhook_url: Option<String>,
}

/// A mobile device of a user (a `user_devices` row), for the `push` channel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// `user_devices.id`.
    pub id: String,
    /// Its owner.
    pub user_id: String,
    /// The FCM registration token.
    pub token: String,
    /// `android`, `ios` or `web`.
    pub platform: String,
}
