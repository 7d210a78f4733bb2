// The scale simulator of issue 22: N simulated supervisors in one process, one gRPC client (one TCP
// connection) each, speaking ConnectSupervisor as the real supervisor does (hello with journal bounds
// and connection_epoch, resume checks, jittered heartbeats at the gateway's interval, SessionUpdate,
// ReconnectHint, retry_after_ms, full-jitter backoff or upstream's), with in-memory journals whose
// every acknowledgement is checked. Progress: one JSON line per second on stdout; the final JSON
// (counters, RTT quantiles, per-second series, per-supervisor journal bounds) to -out.
//
// It runs until -duration after the last start, or SIGTERM/SIGINT; then it stops writing, waits up to
// -drain for the acknowledgements, and writes the result.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

type sample struct {
	T        float64 `json:"t"`
	UnixMs   int64   `json:"unix_ms"`
	Up       int64   `json:"up"`
	Accepts  int64   `json:"accepts"`
	Attempts int64   `json:"attempts"`
	HB       int64   `json:"heartbeats_echoed"`
	P50      float64 `json:"rtt_p50_ms"`
	P99      float64 `json:"rtt_p99_ms"`
	// CPU seconds (cumulative) and RSS of each -watch-pid, in order, and of this process.
	WatchCPU []float64 `json:"watch_cpu_s"`
	WatchRSS []float64 `json:"watch_rss_mib"`
	SelfCPU  float64   `json:"self_cpu_s"`
	SelfRSS  float64   `json:"self_rss_mib"`
	Gor      int       `json:"goroutines"`
}

type finalSup struct {
	ID         string `json:"id"`
	Epoch      string `json:"epoch"`
	Written    uint64 `json:"written"`
	Acked      uint64 `json:"acked"`
	LastAccept int64  `json:"last_accept_unix_ms"`
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func die(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "sim: "+format+"\n", a...)
	os.Exit(2)
}

func main() {
	var (
		addrs    = flag.String("addr", "127.0.0.1:7070", "gateway gRPC address(es), comma-separated: each attempt picks one at random")
		n        = flag.Int("n", 100, "simulated supervisors in this process")
		firstIdx = flag.Int("first", 0, "index of the first supervisor (ids <prefix>-<index>)")
		prefix   = flag.String("prefix", "sim", "sandbox id prefix")
		srcs     = flag.String("src", "127.0.0.1", "local source addresses, comma-separated, round robin per supervisor")
		caps     = flag.String("caps", "resume,events,reconnect,interval", "capabilities listed in the hello")
		rate     = flag.Float64("rate", 200, "sessions started per second (0: all at once)")
		dur      = flag.Duration("duration", 60*time.Second, "how long to run after the last start (0: until SIGTERM)")
		jitter   = flag.Float64("jitter", 0.2, "heartbeat jitter: interval x (1 +/- jitter x U)")
		evEvery  = flag.Duration("event-every", 0, "each supervisor appends events this often (0: none)")
		evPer    = flag.Int("events-per-tick", 1, "events appended per tick")
		unjit    = flag.Bool("unjittered", false, "upstream's reconnect: 1 s doubling to 30 s, no jitter, never reset")
		connTO   = flag.Duration("connect-timeout", 5*time.Second, "wait this long for the hello's answer")
		out      = flag.String("out", "", "final JSON result file (default: the last line of stdout)")
		drain    = flag.Duration("drain", 10*time.Second, "at the end: stop writing, wait this long for the acknowledgements")
		watch    = flag.String("watch-pid", "", "comma-separated pids whose CPU seconds and RSS are sampled each second")
		addrFile = flag.String("addr-file", "", "a file holding the comma-separated addresses, re-read when it changes (a Service's endpoints); -addr until it exists")
	)
	flag.Parse()
	c := &cfg{addrs: splitList(*addrs), caps: splitList(*caps), jitter: *jitter, connectTimeout: *connTO,
		eventEvery: *evEvery, eventsPerTick: *evPer, maxInflight: 8, batchMax: 1000, upstream: *unjit, addrFile: *addrFile}
	if len(c.addrs) == 0 || *n <= 0 {
		die("need -addr and -n > 0")
	}
	for _, s := range splitList(*srcs) {
		ip := net.ParseIP(s)
		if ip == nil {
			die("-src: %q is not an IP address", s)
		}
		c.srcIPs = append(c.srcIPs, ip)
	}
	var watchPids []int
	for _, p := range splitList(*watch) {
		pid, err := strconv.Atoi(p)
		if err != nil {
			die("-watch-pid: %q is not a pid", p)
		}
		watchPids = append(watchPids, pid)
	}
	writing.Store(true)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	runCtx, cancelRun := context.WithCancel(context.Background())

	sups := make([]*sup, *n)
	for i := range sups {
		idx := *firstIdx + i
		id := fmt.Sprintf("%s-%06d", *prefix, idx)
		sups[i] = &sup{c: c, idx: idx, instance: randHex(8), j: &journal{id: id, epoch: randHex(8)}}
		if *evEvery > 0 {
			sups[i].j.append(2) // written before the first connection, as a starting supervisor's journal
		}
	}
	var wg sync.WaitGroup
	startAll := time.Now()
	go func() {
		for i, s := range sups {
			if *rate > 0 {
				target := startAll.Add(time.Duration(float64(i) / *rate * float64(time.Second)))
				if d := time.Until(target); d > 0 {
					select {
					case <-time.After(d):
					case <-runCtx.Done():
						return
					}
				}
			}
			wg.Add(1)
			go func(s *sup) { defer wg.Done(); s.run(runCtx) }(s)
		}
	}()

	var end time.Time
	if *dur > 0 {
		ramp := time.Duration(0)
		if *rate > 0 {
			ramp = time.Duration(float64(*n) / *rate * float64(time.Second))
		}
		end = startAll.Add(ramp + *dur)
	}
	var series []sample
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	allUpAt := -1.0
	var lastAcc, lastHB, lastAtt int64
	enc := json.NewEncoder(os.Stdout)
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case now := <-tick.C:
			q := quantiles(st.rttWin.take(true), 0.5, 0.99)
			acc, hb, att := st.accepted.Load(), st.hbEchoed.Load(), st.attempts.Load()
			smp := sample{T: now.Sub(startAll).Seconds(), UnixMs: now.UnixMilli(), Up: st.up.Load(),
				Accepts: acc - lastAcc, Attempts: att - lastAtt, HB: hb - lastHB, P50: q[0], P99: q[1],
				Gor: runtime.NumGoroutine()}
			for _, pid := range watchPids {
				cpu, rss := procSample(pid)
				smp.WatchCPU = append(smp.WatchCPU, cpu)
				smp.WatchRSS = append(smp.WatchRSS, rss)
			}
			smp.SelfCPU, smp.SelfRSS = procSample(os.Getpid())
			lastAcc, lastHB, lastAtt = acc, hb, att
			series = append(series, smp)
			if allUpAt < 0 && smp.Up == int64(*n) {
				allUpAt = smp.T
			}
			_ = enc.Encode(smp)
			if !end.IsZero() && now.After(end) {
				break loop
			}
		}
	}
	// Stop writing, let the acknowledgements catch up, then leave.
	writing.Store(false)
	deadline := time.Now().Add(*drain)
	for time.Now().Before(deadline) && st.eventsAcked.Load() < st.eventsWritten.Load() {
		time.Sleep(100 * time.Millisecond)
	}
	cancelRun()
	wg.Wait()

	qa := quantiles(st.rttAll.take(false), 0.5, 0.9, 0.99, 0.999)
	finals := make([]finalSup, len(sups))
	for i, s := range sups {
		w, a := s.j.final()
		finals[i] = finalSup{ID: s.j.id, Epoch: s.j.epoch, Written: w, Acked: a, LastAccept: s.lastAccept.Load()}
	}
	sort.Slice(finals, func(i, j int) bool { return finals[i].ID < finals[j].ID })
	st.mu.Lock()
	res := map[string]any{
		"n": *n, "rate": *rate, "upstream_backoff": *unjit, "caps": c.caps, "start_unix_ms": startAll.UnixMilli(),
		"all_up_at_s": allUpAt, "attempts": st.attempts.Load(), "accepted": st.accepted.Load(),
		"rejected": st.rejected.Load(), "rejected_by_code": st.rejectedByCode, "failed_attempts": st.failedAttempts.Load(),
		"connect_timeouts": st.connectTimeouts.Load(), "hints": st.hints.Load(), "session_updates": st.updates.Load(),
		"heartbeats_sent": st.hbSent.Load(), "heartbeats_echoed": st.hbEchoed.Load(),
		"rtt_ms":         map[string]float64{"p50": qa[0], "p90": qa[1], "p99": qa[2], "p999": qa[3]},
		"events_written": st.eventsWritten.Load(), "events_acked": st.eventsAcked.Load(), "checks": st.checks.Load(),
		"violations": st.violations.Load(), "violation_samples": st.violationText, "errors": st.errCounts,
		"series": series, "supervisors": finals,
	}
	st.mu.Unlock()
	if *out == "" {
		_ = enc.Encode(res)
		return
	}
	f, err := os.Create(*out)
	if err != nil {
		die("cannot write %s: %v", *out, err)
	}
	if err := json.NewEncoder(f).Encode(res); err != nil {
		die("cannot write %s: %v", *out, err)
	}
	if err := f.Close(); err != nil {
		die("cannot write %s: %v", *out, err)
	}
}
