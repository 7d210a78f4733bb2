package main

import (
	"fmt"
	"math"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A log-bucketed histogram (2 % resolution, 1 us .. 100 s), lock-free: thousands of goroutines add
// to it at once, the sampler swaps it out each second.
const hBase = 1.02

var hBuckets = int(math.Ceil(math.Log(1e8)/math.Log(hBase))) + 1

type hist struct{ b []atomic.Uint64 }

func newHist() *hist { return &hist{b: make([]atomic.Uint64, hBuckets)} }

func (h *hist) add(d time.Duration) {
	us := float64(d.Nanoseconds()) / 1e3
	i := 0
	if us > 1 {
		i = int(math.Log(us) / math.Log(hBase))
	}
	h.b[min(i, hBuckets-1)].Add(1)
}

// take returns the counts and, with reset, empties the histogram.
func (h *hist) take(reset bool) []uint64 {
	out := make([]uint64, hBuckets)
	for i := range h.b {
		if reset {
			out[i] = h.b[i].Swap(0)
		} else {
			out[i] = h.b[i].Load()
		}
	}
	return out
}

// quantiles of the counts, in milliseconds (the upper edge of the bucket: never optimistic).
func quantiles(c []uint64, qs ...float64) []float64 {
	var n uint64
	for _, v := range c {
		n += v
	}
	res := make([]float64, len(qs))
	if n == 0 {
		return res
	}
	for qi, q := range qs {
		want := uint64(math.Ceil(q * float64(n)))
		var acc uint64
		for i, v := range c {
			acc += v
			if acc >= want {
				res[qi] = math.Pow(hBase, float64(i+1)) / 1e3
				break
			}
		}
	}
	return res
}

// stats are the fleet's counters, shared by every simulated supervisor of this process.
type stats struct {
	up, attempts, accepted, rejected, failedAttempts, connectTimeouts atomic.Int64
	hbSent, hbEchoed, hints, updates                                  atomic.Int64
	eventsWritten, eventsAcked, checks, violations                    atomic.Int64
	rttAll, rttWin                                                    *hist

	mu             sync.Mutex
	violationText  []string
	errCounts      map[string]int
	rejectedByCode map[string]int
}

var st = stats{rttAll: newHist(), rttWin: newHist(), errCounts: map[string]int{}, rejectedByCode: map[string]int{}}

// violation records an answer of the gateway that breaks a guarantee (the first 20 kept as text).
func violation(format string, a ...any) {
	st.violations.Add(1)
	st.mu.Lock()
	defer st.mu.Unlock()
	if len(st.violationText) < 20 {
		st.violationText = append(st.violationText, fmt.Sprintf(format, a...))
	}
}

// noteErr counts why sessions ended or attempts failed, by (truncated) text.
func noteErr(err error) {
	t := err.Error()
	if len(t) > 120 {
		t = t[:120]
	}
	st.mu.Lock()
	st.errCounts[t]++
	st.mu.Unlock()
}

func noteRejected(code string) {
	st.rejected.Add(1)
	st.mu.Lock()
	st.rejectedByCode[code]++
	st.mu.Unlock()
}

// procSample reads a process's CPU seconds (user+system) and RSS in MiB from /proc; zeros when it is gone.
func procSample(pid int) (cpu float64, rssMiB float64) {
	if pid <= 0 {
		return 0, 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 22 {
		return 0, 0
	}
	var ut, stt, rss float64
	_, _ = fmt.Sscan(f[11], &ut)
	_, _ = fmt.Sscan(f[12], &stt)
	_, _ = fmt.Sscan(f[21], &rss)
	// CLK_TCK is 100 on Linux.
	return (ut + stt) / 100, rss * float64(os.Getpagesize()) / (1 << 20)
}
