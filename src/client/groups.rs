//! `doparallel groups` and `doparallel group set|show|delete`: the limits a group of jobs
//! shares across every node, and what it runs now.

use super::commands::{print, print_raw, tell};
use super::output::table;
use super::{Client, ClientError, EXIT_COMPLETE};
use crate::api::wire::GroupView;
use crate::config::{GroupAction, GroupArgs, GroupsArgs};

/// The columns of the groups table.
pub const GROUP_COLUMNS: [&str; 6] = [
    "GROUP",
    "CONCURRENCY",
    "RATE",
    "IN FLIGHT",
    "JOBS",
    "LIMITS",
];

/// One row of the groups table: the limits in effect, whose they are, and its counts.
fn group_row(group: &GroupView) -> Vec<String> {
    let concurrency = group.concurrency.map_or("-".to_string(), |c| c.to_string());
    let in_flight = match group.concurrency {
        Some(c) => format!("{}/{c}", group.in_flight),
        None => group.in_flight.to_string(),
    };
    let limits = match &group.own {
        Some(_) => "own",
        None if group.concurrency.is_some() => "default",
        None => "none",
    };
    vec![
        group.name.clone(),
        concurrency,
        group.rate.map_or("-".to_string(), |r| format!("{r}/s")),
        in_flight,
        group.jobs.to_string(),
        limits.to_string(),
    ]
}

/// `doparallel groups`.
pub async fn groups(args: GroupsArgs) -> Result<u8, ClientError> {
    let client = Client::from_args(&args.client)?;
    let page = client.groups().await?;
    if args.client.json {
        print_raw(&page.raw)?;
        return Ok(EXIT_COMPLETE);
    }
    if page.value.groups.is_empty() {
        tell("no groups with limits or unfinished jobs");
    } else {
        let rows: Vec<_> = page.value.groups.iter().map(group_row).collect();
        print(&table(&GROUP_COLUMNS, &rows))?;
    }
    if let Some(c) = page.value.default_concurrency {
        tell(&format!(
            "a group without its own concurrency has {c} (--group-concurrency)"
        ));
    }
    Ok(EXIT_COMPLETE)
}

/// `doparallel group set|show|delete NAME`.
pub async fn group(args: GroupArgs) -> Result<u8, ClientError> {
    let (json, answer) = match &args.action {
        GroupAction::Set {
            name,
            concurrency,
            rate,
            client,
        } => {
            let api = Client::from_args(client)?;
            // What is not given keeps its value: the group's own limits as they are now.
            let mut limits = api.group(name).await?.value.own.unwrap_or_default();
            if let Some(c) = concurrency {
                limits.concurrency = c.0.map(|c| u32::try_from(c).unwrap_or(u32::MAX));
            }
            if let Some(r) = rate {
                limits.rate = r.0;
            }
            let answer = api.group_set(name, Some(&limits)).await?;
            (client.json, answer)
        }
        GroupAction::Show { name, client } => {
            let api = Client::from_args(client)?;
            let answer = api.group(name).await?;
            (client.json, answer)
        }
        GroupAction::Delete { name, client } => {
            let api = Client::from_args(client)?;
            let answer = api.group_set(name, None).await?;
            (client.json, answer)
        }
    };
    if json {
        print_raw(&answer.raw)?;
    } else {
        print(&table(&GROUP_COLUMNS, &[group_row(&answer.value)]))?;
    }
    Ok(EXIT_COMPLETE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::GroupLimits;

    #[test]
    fn a_row_shows_the_limits_in_effect_and_whose() {
        let group = |concurrency, rate, own| GroupView {
            name: "acme".into(),
            concurrency,
            rate,
            own,
            in_flight: 3,
            jobs: 2,
        };
        let own = GroupLimits {
            concurrency: Some(4),
            rate: Some(2.5),
        };
        assert_eq!(
            group_row(&group(Some(4), Some(2.5), Some(own))),
            ["acme", "4", "2.5/s", "3/4", "2", "own"]
        );
        assert_eq!(
            group_row(&group(Some(8), None, None)),
            ["acme", "8", "-", "3/8", "2", "default"]
        );
        assert_eq!(
            group_row(&group(None, None, None)),
            ["acme", "-", "-", "3", "2", "none"]
        );
    }
}
