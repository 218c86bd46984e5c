//! Groups of jobs (`options.group`): the limits all of a group's jobs share across every
//! node (`PUT /v1/groups/{name}`), and what each group runs now. A group belongs to the
//! token whose jobs name it.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use bytes::Bytes;

use super::AppState;
use super::error::{ApiError, body_error};
use super::wire::{ErrorBody, GroupPage, GroupView};
use crate::auth::Owner;
use crate::job::{GroupLimits, is_group_name};
use crate::store::GroupRecord;

/// A group as the API shows it, with the server's default where it has no own limit.
fn view(record: GroupRecord, default_concurrency: Option<u32>) -> GroupView {
    let limits = GroupLimits::effective(record.own.as_ref(), default_concurrency);
    GroupView {
        name: record.name,
        concurrency: limits.concurrency,
        rate: limits.rate,
        own: record.own,
        in_flight: record.in_flight,
        jobs: record.jobs,
    }
}

/// The name in the path, if it may name a group.
fn group_name(name: &str) -> Result<&str, ApiError> {
    if is_group_name(name) {
        Ok(name)
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{name:?} is not a group name (1 to 128 letters, digits and . - _ : @)"),
        ))
    }
}

/// The group `name` of `owner` as it is now: its record, or one with no limits of its own
/// and nothing running when the store has none.
async fn read(state: &AppState, owner: &Owner, name: &str) -> Result<GroupView, ApiError> {
    let store = state.services.store.as_ref();
    let record = store
        .groups_list(owner.0.as_deref(), Some(name))
        .await?
        .into_iter()
        .next()
        .unwrap_or(GroupRecord {
            name: name.to_string(),
            own: None,
            in_flight: 0,
            jobs: 0,
        });
    Ok(view(record, state.config.group_concurrency))
}

/// The caller's groups that have limits of their own or unfinished jobs, by name, each
/// with its limits in effect and its calls in flight.
#[utoipa::path(
    get, path = "/v1/groups", tag = "groups",
    responses(
        (status = 200, body = GroupPage),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn list_groups(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
) -> Result<Json<GroupPage>, ApiError> {
    let default_concurrency = state.config.group_concurrency;
    let groups = state
        .services
        .store
        .groups_list(owner.0.as_deref(), None)
        .await?
        .into_iter()
        .map(|record| view(record, default_concurrency))
        .collect();
    Ok(Json(GroupPage {
        default_concurrency,
        groups,
    }))
}

/// A group's limits in effect and its calls in flight. A group nobody set limits for
/// answers with the server's default, and counts of zero when it has no unfinished job.
#[utoipa::path(
    get, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    responses(
        (status = 200, body = GroupView),
        (status = 422, description = "Not a group name", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn get_group(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(name): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    let name = group_name(&name)?;
    Ok(Json(read(&state, &owner, name).await?))
}

/// Set a group's own limits, replacing any before: `concurrency`, the most calls of all
/// its jobs in flight at once, and `rate`, the most started per second, both across every
/// node (either may be `null` or left out: no limit of that kind; without its own
/// concurrency a group has the server's `--group-concurrency`). The next claim on every
/// node obeys them; calls already started finish.
#[utoipa::path(
    put, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    request_body(content = GroupLimits, content_type = "application/json"),
    responses(
        (status = 200, description = "The group, with its new limits", body = GroupView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 422, description = "Not a group name, or a bad limit", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn put_group(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let name = group_name(&name)?;
    let body = body.map_err(body_error)?;
    let limits: GroupLimits = serde_json::from_slice(&body).map_err(|e| {
        let status = if e.is_syntax() || e.is_eof() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::new(
            status,
            format!("expected {{\"concurrency\": N, \"rate\": R}}: {e}"),
        )
    })?;
    limits
        .check()
        .map_err(|msg| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, msg))?;
    state
        .services
        .store
        .group_set(owner.0.as_deref(), name, &limits)
        .await?;
    tracing::info!(group = name, ?limits, "group limits set");
    state.services.bus.work();
    Ok(Json(read(&state, &owner, name).await?))
}

/// Remove a group's own limits: it has the server's default again.
#[utoipa::path(
    delete, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    responses(
        (status = 200, description = "The group, without limits of its own", body = GroupView),
        (status = 404, description = "The group has no limits of its own", body = ErrorBody),
        (status = 422, description = "Not a group name", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub(super) async fn delete_group(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(name): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    let name = group_name(&name)?;
    let removed = state
        .services
        .store
        .group_delete(owner.0.as_deref(), name)
        .await?;
    if !removed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("group {name:?} has no limits of its own"),
        ));
    }
    tracing::info!(group = name, "group limits removed");
    state.services.bus.work();
    Ok(Json(read(&state, &owner, name).await?))
}
