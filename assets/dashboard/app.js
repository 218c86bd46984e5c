// The DoParallel dashboard: a jobs list (#/) and a job page (#/jobs/ID) over the public JSON
// API, in plain JavaScript with no build step and nothing loaded from elsewhere.
//
// Rule of this file: whatever comes from the server is put in the page as text (element
// constructors, `append` of strings, `setAttribute`), never parsed as markup. Task results
// and errors come from arbitrary endpoints.
'use strict';

(() => {
  const JOBS_POLL_MS = 2000;
  const JOB_POLL_MS = 1000;
  // While the events stream is open the job is still read at this slow pace: the stream
  // carries counts, not the callback's delivery, and a lost event then costs a delay only.
  const JOB_BACKSTOP_MS = 5000;
  // After the job finished, how often its callback is looked at until it settles.
  const CALLBACK_POLL_MS = 2000;
  // Progress events come up to four times a second; the task table follows at most once.
  const TASKS_MIN_GAP_MS = 1000;
  const JOBS_PAGE = 25;
  const TASKS_PAGE = 50;
  const PREVIEW_CHARS = 100;
  const TOOLTIP_CHARS = 2000;
  const TOKEN_KEY = 'doparallel.apiToken';
  const JOB_STATUSES = ['Scheduled', 'Pending', 'Running', 'Paused', 'Complete', 'Failed', 'Cancelled'];
  const TASK_STATUSES = ['Pending', 'Running', 'Complete', 'Failed', 'Cancelled'];
  const FINISHED = new Set(['Complete', 'Failed', 'Cancelled']);

  const view = document.getElementById('view');
  const banner = document.getElementById('banner');

  // ---- DOM, as text only ------------------------------------------------------------------

  /** An element with attributes (`on...` are listeners) and children (strings become text). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
      else if (key === 'style') Object.assign(node.style, value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function jobHref(id, status) {
    return '#/jobs/' + encodeURIComponent(id) + (status ? '?status=' + encodeURIComponent(status) : '');
  }

  // ---- Formatting ---------------------------------------------------------------------------

  function ago(iso) {
    if (!iso) return '—';
    const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    if (s < 5) return 'just now';
    if (s < 60) return s + 's ago';
    if (s < 3600) return Math.floor(s / 60) + 'm ago';
    if (s < 86400) return Math.floor(s / 3600) + 'h ago';
    return Math.floor(s / 86400) + 'd ago';
  }

  function duration(ms) {
    if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
    if (ms < 1000) return Math.round(ms) + ' ms';
    const s = ms / 1000;
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + ' s';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + Math.floor(s % 60) + 's';
    return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
  }

  /**
   * Brings the relative times under `root` up to date without rebuilding anything, so that a
   * poll that brought no change keeps hovers, selections and open details as they are.
   */
  function retime(root) {
    for (const node of root.querySelectorAll('time[datetime]')) node.textContent = ago(node.getAttribute('datetime'));
    for (const node of root.querySelectorAll('[data-since]')) node.textContent = duration(Date.now() - Number(node.dataset.since));
  }

  function localTime(iso) {
    return iso ? new Date(iso).toLocaleString() : '';
  }

  /** A relative time that shows the absolute one on hover, as Sidekiq and Flower do. */
  function timeCell(iso) {
    return el('time', { datetime: iso || undefined, title: localTime(iso) || undefined }, ago(iso));
  }

  function badge(status) {
    return el('span', { class: 'badge badge-' + String(status).toLowerCase() }, status);
  }

  /**
   * Tasks that ran to an outcome, Complete or Failed. Cancelled tasks never ran, so a
   * cancelled job shows how far it got rather than a full bar (as the command-line client).
   */
  function done(job) {
    return job.counts.complete + job.counts.failed;
  }

  /** A bar in three parts (complete, failed, running) over the job's total. */
  function progressBar(job, withLabel) {
    const total = job.total || 0;
    const pct = (n) => (total ? (100 * n) / total : 0).toFixed(2) + '%';
    const whole = total ? Math.floor((100 * done(job)) / total) : 100;
    const bar = el('div', {
      class: 'progress',
      role: 'progressbar',
      'aria-valuemin': 0,
      'aria-valuemax': total,
      'aria-valuenow': done(job),
      title: `${job.counts.complete} complete, ${job.counts.failed} failed, ` +
        `${job.counts.cancelled || 0} cancelled, ${job.counts.running} running, ` +
        (job.counts.queued ? `${job.counts.queued} queued at a host's limits, ` : '') +
        `${job.counts.pending} pending of ${total}`,
    },
    el('span', { class: 'seg seg-complete', style: { width: pct(job.counts.complete) } }),
    el('span', { class: 'seg seg-failed', style: { width: pct(job.counts.failed) } }),
    el('span', { class: 'seg seg-running', style: { width: pct(job.counts.running) } }));
    return withLabel ? el('div', { class: 'progress-wrap' }, bar, el('span', { class: 'pct' }, whole + '%')) : bar;
  }

  // Results keep their numbers digit for digit on the server; parse so that the page does too
  // (where the browser can: JSON.rawJSON), rather than rounding 2^53 + 1 for display. Only
  // the tasks' own data (`result`, `error`, `params`) is kept so: the API's own numbers
  // (counts, options such as a `per_host_rate` of `10.0`) are plain numbers, which the page
  // computes and prints with.
  const DATA_KEYS = new Set(['result', 'error', 'params']);

  function parseJson(text) {
    if (typeof JSON.rawJSON !== 'function') return JSON.parse(text);
    const exact = JSON.parse(text, (key, value, context) =>
      typeof value === 'number' && context && context.source !== undefined && String(value) !== context.source
        ? JSON.rawJSON(context.source)
        : value);
    return plainOutsideData(exact);
  }

  /** Turns exact numbers back into plain ones everywhere but under the tasks' data keys. */
  function plainOutsideData(value) {
    if (value === null || typeof value !== 'object') return value;
    if (typeof JSON.isRawJSON === 'function' && JSON.isRawJSON(value)) return Number(value.rawJSON);
    if (Array.isArray(value)) return value.map(plainOutsideData);
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = DATA_KEYS.has(k) ? v : plainOutsideData(v);
    return out;
  }

  function clip(text, n) {
    return text.length > n ? text.slice(0, n) + '…' : text;
  }

  /**
   * A value as compact JSON; a long one is cut, with the full text on hover and, once
   * expanded, pretty-printed. `key` names it so that it stays expanded across refreshes.
   */
  function jsonCell(value, kind, key, expanded) {
    const compact = value === undefined ? '' : JSON.stringify(value);
    if (compact.length <= PREVIEW_CHARS) return el('code', { class: 'json json-' + kind }, compact);
    const details = el('details', { class: 'json json-' + kind, open: expanded.has(key) },
      el('summary', { title: clip(compact, TOOLTIP_CHARS) }, clip(compact, PREVIEW_CHARS)),
      el('pre', {}, JSON.stringify(value, null, 2)));
    details.addEventListener('toggle', () => {
      if (details.open) expanded.add(key); else expanded.delete(key);
    });
    return details;
  }

  // ---- API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function token() {
    try {
      return localStorage.getItem(TOKEN_KEY) || '';
    } catch {
      return '';
    }
  }

  async function api(path, options) {
    const headers = { Accept: 'application/json' };
    const t = token();
    if (t) headers.Authorization = 'Bearer ' + t;
    let response;
    try {
      response = await fetch(path, { ...options, headers, cache: 'no-store' });
    } catch {
      throw new ApiError(0, 'cannot reach the server');
    }
    const text = await response.text();
    let body = text;
    try {
      body = text ? parseJson(text) : null;
    } catch {
      // Not JSON: keep the text for the message.
    }
    if (!response.ok) {
      const msg = body && typeof body.msg === 'string' ? body.msg
        : typeof body === 'string' && body ? clip(body, 200) : response.statusText;
      throw new ApiError(response.status, msg);
    }
    return body;
  }

  function showBanner(error) {
    // Three kinds: the server said no, the server could not be reached, or this page failed
    // (a bug here, not the network's: say so rather than blame the connection).
    let text;
    if (!(error instanceof ApiError)) text = `This page failed to show what the server sent (${error && error.message}); retrying. Please report it.`;
    else if (error.status) text = `The server answered ${error.status}: ${error.message}`;
    else text = `Cannot reach the server (${error.message}); retrying.`;
    if (error.status === 401 || error.status === 403) text += ' Set an API token at the top right.';
    banner.replaceChildren(text);
    banner.hidden = false;
  }

  function clearBanner() {
    banner.hidden = true;
    banner.replaceChildren();
  }

  // ---- Timing -------------------------------------------------------------------------------

  /**
   * Runs `fn` now and then again `interval()` ms after each run ends, so runs never overlap.
   * `now()` runs it at once (or right after the run in progress).
   */
  function repeat(fn, interval) {
    let timer = null;
    let running = false;
    let again = false;
    let stopped = false;
    async function tick() {
      timer = null;
      running = true;
      try {
        await fn();
      } finally {
        running = false;
        if (!stopped) {
          if (again) {
            again = false;
            tick();
          } else {
            const ms = interval();
            if (ms !== null) timer = setTimeout(tick, ms);
          }
        }
      }
    }
    tick();
    return {
      now() {
        if (stopped) return;
        if (running) {
          again = true;
        } else {
          clearTimeout(timer);
          tick();
        }
      },
      stop() {
        stopped = true;
        clearTimeout(timer);
      },
    };
  }

  function setHash(hash) {
    // Replaces the address without a hashchange, so the view is kept (and its stream open).
    history.replaceState(null, '', hash);
  }

  /** Filter buttons, Sidekiq-style; `counts` (optional) labels each with its number. */
  function pills(id, choices, current, counts, onPick) {
    return el('div', { class: 'pills', id, role: 'group', 'aria-label': 'Filter by status' },
      choices.map((choice) => el('button', {
        type: 'button',
        class: 'pill' + (choice === current ? ' active' : '') + (choice ? ' pill-' + choice.toLowerCase() : ''),
        'aria-pressed': String(choice === current),
        'data-status': choice || 'All',
        onclick: () => onPick(choice),
      }, choice || 'All', counts ? el('span', { class: 'count' }, counts(choice)) : null)));
  }

  // ---- Jobs list ----------------------------------------------------------------------------

  function jobsView(query) {
    const state = {
      status: JOB_STATUSES.includes(query.get('status')) ? query.get('status') : '',
      group: query.get('group') || '',
      after: null, // cursor of the page shown; null for the newest
      previous: [], // cursors of the pages before it
      next: null,
    };
    document.title = 'Jobs · DoParallel';

    const filterSlot = el('div');
    const groupsSlot = el('div', { class: 'groups', id: 'groups' });
    const hostsSlot = el('div', { class: 'hosts', id: 'hosts' });
    const tbody = el('tbody');
    const updated = el('span', { class: 'live', id: 'jobs-updated' }, 'loading…');
    const newer = el('button', { type: 'button', class: 'btn', onclick: () => page(-1) }, '‹ Newer');
    const older = el('button', { type: 'button', class: 'btn', onclick: () => page(1) }, 'Older ›');
    view.replaceChildren(el('section', { class: 'jobs' },
      el('div', { class: 'title-row' }, el('h1', {}, 'Jobs'), updated),
      filterSlot,
      el('table', { class: 'table', id: 'jobs-table' },
        el('thead', {}, el('tr', {},
          el('th', {}, 'Job'),
          el('th', {}, 'Status'),
          el('th', { class: 'col-progress' }, 'Progress'),
          el('th', { class: 'num', title: 'Tasks that ran to an outcome: complete or failed' }, 'Done'),
          el('th', { class: 'num' }, 'Failed'),
          el('th', { class: 'num' }, 'Total'),
          el('th', {}, 'Callback'),
          el('th', {}, 'Created'),
          el('th', { class: 'num' }, 'Duration'))),
        tbody),
      el('div', { class: 'pager' }, newer, older),
      groupsSlot,
      hostsSlot));

    // The groups of jobs with limits or unfinished jobs: each one's calls in flight (on
    // every node) against its concurrency, its rate, its unfinished jobs. A name shows only
    // that group's jobs.
    function renderGroups(groups) {
      if (!groups.length) {
        groupsSlot.replaceChildren();
        return;
      }
      const limited = (value, unit) => (value === null || value === undefined ? 'none' : `${value}${unit}`);
      groupsSlot.replaceChildren(el('h2', {}, 'Groups'),
        el('table', { class: 'table', id: 'groups-table' },
          el('thead', {}, el('tr', {},
            el('th', {}, 'Group'),
            el('th', { class: 'num', title: 'Calls in flight now, on every node, against the group\'s concurrency' }, 'In flight'),
            el('th', { class: 'num', title: 'Most calls started per second' }, 'Rate'),
            el('th', { class: 'num', title: 'Unfinished jobs' }, 'Jobs'),
            el('th', {}, 'Limits'))),
          el('tbody', {}, ...groups.map((g) => el('tr', { class: 'group-row', 'data-group': g.name },
            el('td', {}, el('a', {
              class: 'mono', href: '#/?group=' + encodeURIComponent(g.name),
              onclick: (event) => {
                event.preventDefault();
                state.group = g.name;
                groupInput.value = g.name;
                refilter();
              },
            }, g.name)),
            el('td', { class: 'num group-in-flight' }, `${g.in_flight} / ${limited(g.concurrency, '')}`),
            el('td', { class: 'num' }, limited(g.rate, ' /s')),
            el('td', { class: 'num' }, g.jobs),
            el('td', {}, g.own ? 'own' : (g.concurrency ? 'default' : el('span', { class: 'muted' }, 'none'))))))));
    }

    // The hosts this node calls: each one's limit (an adaptive one's value now), calls under
    // way and waiting, its breaker. Shown while there are any.
    function renderHosts(hosts) {
      if (!hosts.length) {
        hostsSlot.replaceChildren();
        return;
      }
      hostsSlot.replaceChildren(el('h2', {}, 'Hosts on this node'),
        el('table', { class: 'table', id: 'hosts-table' },
          el('thead', {}, el('tr', {},
            el('th', {}, 'Host'),
            el('th', { class: 'num', title: 'Most calls in flight at once: adaptive (auto) or fixed' }, 'Limit'),
            el('th', { class: 'num' }, 'In flight'),
            el('th', { class: 'num' }, 'Waiting'),
            el('th', {}, 'Breaker'))),
          el('tbody', {}, ...hosts.map((h) => el('tr', { class: 'host-row', 'data-host': h.host },
            el('td', {}, el('span', { class: 'mono' }, h.host)),
            el('td', { class: 'num host-limit' }, h.limit === null || h.limit === undefined ? 'none' : (h.adaptive ? `auto ${h.limit}` : String(h.limit))),
            el('td', { class: 'num' }, h.in_flight),
            el('td', { class: 'num' }, h.waiting),
            el('td', {}, h.breaker === 'open' ? badge('open') : el('span', { class: 'muted' }, 'closed')))))));
    }

    function filterHash() {
      const params = new URLSearchParams();
      if (state.status) params.set('status', state.status);
      if (state.group) params.set('group', state.group);
      const text = params.toString();
      return text ? '#/?' + text : '#/';
    }

    function refilter() {
      state.after = null;
      state.previous = [];
      setHash(filterHash());
      renderFilter();
      poller.now();
    }

    // A group's jobs only (`options.group`): typed, then Enter.
    const groupInput = el('input', {
      type: 'search', id: 'group-filter', class: 'group-filter', placeholder: 'group',
      'aria-label': 'Only the jobs of this group', value: state.group,
    });
    groupInput.addEventListener('change', () => {
      state.group = groupInput.value.trim();
      refilter();
    });

    function renderFilter() {
      filterSlot.replaceChildren(el('div', { class: 'filters' },
        pills('jobs-filter', ['', ...JOB_STATUSES], state.status, null, (s) => {
          state.status = s;
          refilter();
        }),
        groupInput));
    }

    function page(direction) {
      if (direction > 0 && state.next) {
        state.previous.push(state.after);
        state.after = state.next;
      } else if (direction < 0 && state.previous.length) {
        state.after = state.previous.pop();
      } else {
        return;
      }
      poller.now();
    }

    let shown = null;

    function render(jobs) {
      const key = JSON.stringify([jobs, state.status, state.group, state.previous.length, state.next]);
      if (key === shown) {
        retime(tbody);
        return;
      }
      shown = key;
      if (!jobs.length) {
        tbody.replaceChildren(el('tr', {}, el('td', { colspan: 9, class: 'empty' },
          state.status || state.group
            ? `No ${state.status ? state.status.toLowerCase() + ' ' : ''}jobs${state.group ? ' in group ' + state.group : ''}.`
            : 'No jobs yet. Submit one with POST /v1/job.')));
      } else {
        tbody.replaceChildren(...jobs.map((job) => {
          const start = Date.parse(job.created_at);
          const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
          return el('tr', { class: 'job-row', 'data-job-id': job.job_id, 'data-status': job.status },
            el('td', {}, el('a', { class: 'mono', href: jobHref(job.job_id) }, job.job_id)),
            el('td', {}, badge(job.status)),
            el('td', { class: 'col-progress' }, progressBar(job, true)),
            el('td', { class: 'num' }, done(job)),
            el('td', { class: 'num' + (job.counts.failed ? ' failed-count' : '') }, job.counts.failed),
            el('td', { class: 'num' }, job.total),
            el('td', {}, job.callback.state === 'none' ? el('span', { class: 'muted' }, '—') : badge(job.callback.state)),
            el('td', {}, timeCell(job.created_at)),
            el('td', { class: 'num', 'data-since': job.finished_at ? undefined : start }, duration(end - start)));
        }));
      }
      newer.disabled = !state.previous.length;
      older.disabled = !state.next;
    }

    async function load() {
      const params = new URLSearchParams({ limit: String(JOBS_PAGE) });
      if (state.status) params.set('status', state.status);
      if (state.group) params.set('group', state.group);
      if (state.after) params.set('after', state.after);
      try {
        const [answer, groups, hosts] = await Promise.all(
          [api('/v1/jobs?' + params), api('/v1/groups'), api('/v1/hosts')]);
        state.next = answer.next_after;
        render(answer.jobs);
        renderGroups(groups.groups);
        renderHosts(hosts.hosts);
        updated.replaceChildren(el('span', { class: 'dot dot-live' }), `updated ${new Date().toLocaleTimeString()} · every ${JOBS_POLL_MS / 1000} s`);
        clearBanner();
      } catch (e) {
        updated.replaceChildren(el('span', { class: 'dot dot-error' }), 'not updated');
        showBanner(e);
      }
    }

    renderFilter();
    const poller = repeat(load, () => JOBS_POLL_MS);
    return { stop: () => poller.stop() };
  }

  // ---- Job page -----------------------------------------------------------------------------

  function jobView(id, query) {
    const state = {
      filter: TASK_STATUSES.includes(query.get('status')) ? query.get('status') : '',
      job: null,
      after: 0, // tasks shown start after this index
      previous: [],
      next: null,
      shownAt: null, // the job's counts when the table was read, to read it again on change
      tasksAt: 0, // when the table was last read
      tasksTimer: null,
      streaming: false,
      stream: null,
      gone: false,
    };
    const expanded = new Set();
    const base = '/v1/jobs/' + encodeURIComponent(id);
    document.title = 'Job · DoParallel';

    const badgeSlot = el('span');
    const live = el('span', { class: 'live', id: 'job-live' });
    const cancel = el('button', { type: 'button', class: 'btn btn-danger', id: 'cancel', hidden: true, onclick: onCancel }, 'Cancel job');
    const retry = el('button', { type: 'button', class: 'btn', id: 'retry', hidden: true, onclick: onRetry }, 'Retry failed');
    const pause = el('button', { type: 'button', class: 'btn', id: 'pause', hidden: true, onclick: onPause }, 'Pause');
    const note = el('div', { class: 'note', id: 'job-note', role: 'status', hidden: true });
    const summary = el('div', { class: 'summary', id: 'job-summary' });
    const filterSlot = el('div');
    const tbody = el('tbody');
    const pageInfo = el('span', { class: 'muted', id: 'tasks-page' });
    const prev = el('button', { type: 'button', class: 'btn', onclick: () => page(-1) }, '‹ Previous');
    const next = el('button', { type: 'button', class: 'btn', onclick: () => page(1) }, 'Next ›');

    view.replaceChildren(el('section', { class: 'job' },
      el('nav', { class: 'crumbs' }, el('a', { href: '#/' }, 'Jobs'), ' › ', el('span', { class: 'mono' }, id)),
      el('div', { class: 'title-row' },
        el('h1', {}, 'Job ', el('span', { class: 'mono job-id' }, id)),
        badgeSlot, live, el('span', { class: 'spacer' }), retry, pause, cancel),
      note,
      summary,
      el('div', { class: 'title-row' }, el('h2', {}, 'Tasks'), filterSlot),
      el('table', { class: 'table tasks', id: 'tasks-table' },
        el('thead', {}, el('tr', {},
          el('th', { class: 'num' }, '#'),
          el('th', {}, 'Status'),
          el('th', { class: 'num' }, 'Attempts'),
          el('th', { class: 'num' }, 'Latency'),
          el('th', {}, 'Endpoint'),
          el('th', { class: 'col-result' }, 'Result or error'),
          el('th', {}, 'Finished'))),
        tbody),
      el('div', { class: 'pager' }, pageInfo, el('span', { class: 'spacer' }), prev, next)));

    function countOf(status) {
      if (!state.job) return '';
      return status ? state.job.counts[status.toLowerCase()] ?? 0 : state.job.total;
    }

    function renderFilter() {
      filterSlot.replaceChildren(pills('tasks-filter', ['', ...TASK_STATUSES], state.filter, countOf, (s) => {
        state.filter = s;
        state.after = 0;
        state.previous = [];
        setHash(jobHref(id, s));
        renderFilter();
        tasks.now();
      }));
    }

    function page(direction) {
      if (direction > 0 && state.next !== null) {
        state.previous.push(state.after);
        state.after = state.next;
      } else if (direction < 0 && state.previous.length) {
        state.after = state.previous.pop();
      } else {
        return;
      }
      tasks.now();
    }

    function field(label, ...value) {
      return el('div', { class: 'field' }, el('div', { class: 'label' }, label), el('div', { class: 'value' }, value));
    }

    function countBox(name, value) {
      return el('div', { class: 'count-box c-' + name }, el('b', { id: 'count-' + name }, value), el('span', {}, name));
    }

    // The job's own per-host limits, e.g. "4 at once · 10/s"; empty when it sets none.
    function perHost(o) {
      return [
        o.per_host_concurrency != null ? `${o.per_host_concurrency} at once` : null,
        o.per_host_rate != null ? `${o.per_host_rate}/s` : null,
      ].filter(Boolean).join(' · ');
    }

    function renderJob() {
      const job = state.job;
      document.title = `Job ${job.job_id.slice(0, 8)}… ${job.status} · DoParallel`;
      badgeSlot.replaceChildren(el('span', { id: 'job-status', 'data-status': job.status }, badge(job.status)));
      cancel.hidden = FINISHED.has(job.status);
      pause.hidden = FINISHED.has(job.status);
      pause.textContent = job.status === 'Paused' ? 'Resume' : 'Pause';
      // A finished job with failed (or cancelled) tasks, once its callback is no longer owed.
      retry.hidden = !(FINISHED.has(job.status) && (job.counts.failed > 0 || job.counts.cancelled > 0)
        && job.callback.state !== 'pending');
      const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
      const cb = job.callback;
      const o = job.options || {};
      summary.replaceChildren(
        el('div', { class: 'card wide' },
          el('div', { class: 'counts' },
            countBox('total', job.total),
            countBox('complete', job.counts.complete),
            countBox('failed', job.counts.failed),
            job.counts.cancelled ? countBox('cancelled', job.counts.cancelled) : null,
            countBox('running', job.counts.running),
            job.counts.queued ? countBox('queued', job.counts.queued) : null,
            countBox('pending', job.counts.pending)),
          progressBar(job, true)),
        el('div', { class: 'card' },
          field('Created', timeCell(job.created_at), el('span', { class: 'muted' }, ' ' + localTime(job.created_at))),
          o.not_before ? field('Starts', el('span', { id: 'not-before' }, localTime(o.not_before))) : null,
          field('Finished', job.finished_at ? [timeCell(job.finished_at), el('span', { class: 'muted' }, ' ' + localTime(job.finished_at))] : '—'),
          field(job.finished_at ? 'Took' : 'Running for', duration(end - Date.parse(job.created_at))),
          job.deadline_at ? field('Deadline', el('span', { id: 'job-deadline' }, localTime(job.deadline_at))) : null,
          job.run > 1 ? field('Run', el('span', { id: 'job-run' }, String(job.run))) : null),
        el('div', { class: 'card' },
          field('Callback', cb.url ? el('span', { class: 'mono url', title: cb.url }, cb.url) : el('span', { class: 'muted' }, 'none')),
          cb.url ? field('Delivery', el('span', { id: 'callback-state' }, badge(cb.state)), ` ${cb.attempts} attempt${cb.attempts === 1 ? '' : 's'}`) : null,
          cb.last_error ? field('Last error', el('span', { class: 'error-text' }, cb.last_error)) : null),
        el('div', { class: 'card' },
          field('Concurrency', o.concurrency ?? 'unlimited'),
          field('Timeout', duration(o.timeout_ms)),
          field('Attempts', o.max_attempts ?? '—', el('span', { class: 'muted' }, ` · backoff ${duration(o.backoff_ms)}`)),
          field('Tolerated failures', o.tolerated_failures ?? 0),
          o.priority ? field('Priority', el('span', { id: 'job-priority' }, String(o.priority))) : null,
          o.group ? field('Group', el('span', { id: 'job-group', class: 'mono' }, o.group)) : null,
          perHost(o) ? field('Per host', perHost(o)) : null),
        ...(job.metadata ? [el('div', { class: 'card wide' },
          field('Metadata', el('span', { id: 'job-metadata', class: 'mono' }, JSON.stringify(job.metadata))))] : []));
      renderFilter();
      renderLive();
    }

    function renderLive() {
      if (state.gone) live.replaceChildren();
      else if (state.job && FINISHED.has(state.job.status)) live.replaceChildren(el('span', { class: 'dot' }), 'finished');
      else if (state.streaming) live.replaceChildren(el('span', { class: 'dot dot-live' }), 'live');
      else live.replaceChildren(el('span', { class: 'dot dot-poll' }), `polling every ${JOB_POLL_MS / 1000} s`);
    }

    /** Takes in what the server says of the job, from a read, an event or the cancel answer. */
    function update(job) {
      const first = !state.job;
      state.job = { ...state.job, ...job };
      renderJob();
      if (FINISHED.has(state.job.status)) stopStream();
      else if (first) startStream();
      if (JSON.stringify([state.job.status, state.job.counts]) !== state.shownAt) tasksSoon();
    }

    async function loadJob() {
      try {
        update(await api(base));
        clearBanner();
      } catch (e) {
        if (e.status === 404) {
          state.gone = true;
          stopStream();
          summary.replaceChildren(el('div', { class: 'card wide empty' }, `No job with id ${id}.`));
          tbody.replaceChildren();
          renderLive();
        } else {
          showBanner(e);
        }
      }
    }

    /** Reads the task page again soon, at most once per TASKS_MIN_GAP_MS. */
    function tasksSoon() {
      if (state.tasksTimer !== null) return;
      const wait = Math.max(0, state.tasksAt + TASKS_MIN_GAP_MS - Date.now());
      state.tasksTimer = setTimeout(() => {
        state.tasksTimer = null;
        tasks.now();
      }, wait);
    }

    async function loadTasks() {
      if (!state.job) return;
      state.tasksAt = Date.now();
      const shownAt = JSON.stringify([state.job.status, state.job.counts]);
      // One more than shown tells whether there is a next page.
      const params = new URLSearchParams({ after: String(state.after), limit: String(TASKS_PAGE + 1) });
      if (state.filter) params.set('status', state.filter);
      let answer;
      try {
        answer = await api(`${base}/tasks?${params}`);
      } catch (e) {
        showBanner(e);
        return;
      }
      const rows = answer.tasks.slice(0, TASKS_PAGE);
      state.next = answer.tasks.length > TASKS_PAGE ? rows[rows.length - 1].index : null;
      state.shownAt = shownAt;
      renderTasks(rows);
    }

    function renderTasks(rows) {
      if (!rows.length) {
        tbody.replaceChildren(el('tr', {}, el('td', { colspan: 7, class: 'empty' },
          state.filter ? `No ${state.filter.toLowerCase()} tasks.` : 'This job has no tasks.')));
      } else {
        tbody.replaceChildren(...rows.map((t) => el('tr', { class: 'task-row', 'data-index': t.index, 'data-status': t.status },
          el('td', { class: 'num' }, t.index),
          el('td', {}, badge(t.status)),
          el('td', { class: 'num' }, t.attempts),
          el('td', { class: 'num' }, duration(t.latency_ms)),
          el('td', {}, el('span', { class: 'mono url', title: t.endpoint }, t.endpoint)),
          el('td', { class: 'col-result' }, outcome(t)),
          el('td', {}, t.finished_at ? timeCell(t.finished_at) : el('span', { class: 'muted' }, '—')))));
      }
      const skipped = state.previous.length * TASKS_PAGE;
      const what = state.filter ? state.filter.toLowerCase() + ' tasks' : 'tasks';
      pageInfo.replaceChildren(rows.length ? `${what} ${skipped + 1}–${skipped + rows.length} of ${countOf(state.filter)}` : '');
      prev.disabled = !state.previous.length;
      next.disabled = state.next === null;
    }

    function outcome(t) {
      if (t.error !== undefined && t.error !== null) {
        const e = t.error;
        // A reported failure's error is any JSON the endpoint chose: shown as JSON.
        if (typeof e !== 'object' || Array.isArray(e) || typeof e.message !== 'string') {
          return jsonCell(e, 'error', 'e' + t.index, expanded);
        }
        // DoParallel's own errors: the kind and status as a badge, then the most specific
        // cause (or the message), and the rest (the whole message, the endpoint's answer)
        // on demand.
        const head = [e.kind, e.http_status].filter((x) => x !== undefined && x !== null).join(' ');
        const text = e.cause || e.message;
        const rest = [e.message !== text ? e.message : null, e.body || null].filter(Boolean);
        let more = null;
        if (rest.length) {
          const key = 'e' + t.index;
          more = el('details', { class: 'error-more', open: expanded.has(key) },
            el('summary', {}, e.body ? 'answer' : 'details'),
            ...rest.map((part) => el('pre', {}, part)));
          more.addEventListener('toggle', () => {
            if (more.open) expanded.add(key); else expanded.delete(key);
          });
        }
        return el('div', { class: 'outcome' },
          head ? el('span', { class: 'error-kind' }, head) : null,
          el('div', { class: 'error-detail' }, el('span', { class: 'error-text' }, text), more));
      }
      if (t.result !== undefined) return jsonCell(t.result, 'result', 'r' + t.index, expanded);
      // The last progress a heartbeat reported, while the task runs.
      if (t.progress !== undefined && t.progress !== null) {
        return el('div', { class: 'outcome task-progress' },
          el('span', { class: 'muted' }, 'progress '), jsonCell(t.progress, 'progress', 'p' + t.index, expanded));
      }
      return el('span', { class: 'muted' }, '—');
    }

    // The events stream: `progress` (status and counts) while they change, `task_failed` per
    // failure, `finished` (the job) last. A failure also moves the counts, which reread the
    // task page, so `task_failed` needs no handling of its own here.
    function startStream() {
      if (typeof EventSource !== 'function') return;
      let url = base + '/events';
      // EventSource cannot send headers: the token goes in the query instead.
      const t = token();
      if (t) url += '?access_token=' + encodeURIComponent(t);
      const stream = new EventSource(url);
      state.stream = stream;
      const data = (event) => {
        try {
          return parseJson(event.data);
        } catch {
          return null;
        }
      };
      stream.onopen = () => {
        state.streaming = true;
        renderLive();
      };
      stream.addEventListener('progress', (event) => {
        const progress = data(event);
        if (progress) update({ status: progress.status, total: progress.total, counts: progress.counts });
      });
      stream.addEventListener('finished', (event) => {
        // The stream ends here; closing first keeps EventSource from reconnecting.
        stopStream();
        const job = data(event);
        if (job) update(job);
        jobPoller.now(); // the callback's delivery comes after
      });
      stream.onerror = () => {
        // Refused, lost, or an older server: read the job every second instead.
        stopStream();
        renderLive();
        jobPoller.now();
      };
    }

    function stopStream() {
      if (state.stream) state.stream.close();
      state.stream = null;
      state.streaming = false;
    }

    async function onCancel() {
      if (!window.confirm(`Cancel job ${id}? Its tasks that have not finished will not run.`)) return;
      cancel.disabled = true;
      try {
        update(await api(base + '/cancel', { method: 'POST' }));
        showNote('Job cancelled.', false);
      } catch (e) {
        if (e.status === 409) showNote(`Cannot cancel: ${e.message}`, true);
        else showNote(`Cancel failed${e.status ? ' (' + e.status + ')' : ''}: ${e.message}`, true);
      } finally {
        cancel.disabled = false;
        jobPoller.now();
      }
    }

    async function onPause() {
      const verb = state.job && state.job.status === 'Paused' ? 'resume' : 'pause';
      pause.disabled = true;
      try {
        update(await api(`${base}/${verb}`, { method: 'POST' }));
        showNote(verb === 'pause' ? 'Job paused: no new call starts until it is resumed.' : 'Job resumed.', false);
        if (verb === 'resume') startStream();
      } catch (e) {
        showNote(`${verb === 'pause' ? 'Pause' : 'Resume'} failed${e.status ? ' (' + e.status + ')' : ''}: ${e.message}`, true);
      } finally {
        pause.disabled = false;
        jobPoller.now();
      }
    }

    async function onRetry() {
      // A cancelled job runs again with its cancelled tasks; another, with its failed ones.
      const include = state.job && state.job.status === 'Cancelled' ? ['Failed', 'Cancelled'] : ['Failed'];
      retry.disabled = true;
      try {
        const answer = await api(base + '/retry', { method: 'POST', body: JSON.stringify({ include }) });
        const n = answer.requeued;
        showNote(`Retried: ${n} task${n === 1 ? '' : 's'} to run again (run ${answer.run}).`, false);
        startStream();
      } catch (e) {
        showNote(`Retry failed${e.status ? ' (' + e.status + ')' : ''}: ${e.message}`, true);
      } finally {
        retry.disabled = false;
        jobPoller.now();
      }
    }

    function showNote(text, isError) {
      note.className = 'note' + (isError ? ' note-error' : '');
      note.replaceChildren(text);
      note.hidden = false;
    }

    // The task table is read on demand only: when the job's counts move, or on paging.
    const tasks = repeat(loadTasks, () => null);
    const jobPoller = repeat(loadJob, () => {
      const job = state.job;
      if (state.gone) return null;
      if (job && FINISHED.has(job.status)) return job.callback.state === 'pending' ? CALLBACK_POLL_MS : null;
      return state.streaming ? JOB_BACKSTOP_MS : JOB_POLL_MS;
    });
    renderLive();
    return {
      stop() {
        jobPoller.stop();
        tasks.stop();
        clearTimeout(state.tasksTimer);
        stopStream();
      },
    };
  }

  // ---- Token and routing --------------------------------------------------------------------

  const tokenInput = document.getElementById('token-input');
  const tokenClear = document.getElementById('token-clear');
  const tokenState = document.getElementById('token-state');

  function renderToken() {
    const set = !!token();
    tokenInput.value = '';
    tokenInput.placeholder = set ? 'set (hidden)' : 'optional';
    tokenClear.hidden = !set;
    tokenState.replaceChildren(set ? '✓' : '');
  }

  function saveToken(value) {
    try {
      if (value) localStorage.setItem(TOKEN_KEY, value);
      else localStorage.removeItem(TOKEN_KEY);
    } catch {
      // Storage off (private mode): the token cannot be kept.
    }
    renderToken();
    route(); // reopen the view, so that its stream carries the new token
  }

  document.getElementById('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    saveToken(tokenInput.value.trim());
  });
  tokenClear.addEventListener('click', () => saveToken(''));

  let current = null;

  function route() {
    if (current) current.stop();
    clearBanner();
    const hash = location.hash.replace(/^#/, '') || '/';
    const [path, search] = hash.split('?', 2);
    const query = new URLSearchParams(search || '');
    const job = path.match(/^\/jobs\/([^/]+)$/);
    let id = null;
    try {
      id = job && decodeURIComponent(job[1]);
    } catch {
      // A malformed address: show the list.
    }
    current = id ? jobView(id, query) : jobsView(query);
  }

  window.addEventListener('hashchange', route);
  renderToken();
  route();
})();
