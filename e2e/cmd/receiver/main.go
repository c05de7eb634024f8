// Command receiver is a webhook endpoint for trying Bulkhead out: it prints
// each batch it receives and, given the destination's secret, verifies the
// Standard Webhooks signature.
//
//	go run ./e2e/cmd/receiver -addr 127.0.0.1:9000 -secret whsec_...
package main

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/bulkhead-io/bulkhead/pkg/webhook"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9000", "listen address")
	secret := flag.String("secret", "", "the destination's whsec_ secret, to verify signatures")
	status := flag.Int("status", 200, "status to answer with (try 503 to watch quarantine)")
	flag.Parse()
	var keys [][]byte
	if *secret != "" {
		k, err := webhook.ParseSecret(*secret)
		if err != nil {
			fmt.Fprintln(os.Stderr, "receiver:", err)
			os.Exit(2)
		}
		keys = [][]byte{k}
	}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		data, err := webhook.ReadBody(r, 64<<20)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		items, err := webhook.DecodeBody(data)
		if err != nil {
			fmt.Printf("%s %s undecodable body: %v\n", time.Now().Format(time.TimeOnly), r.URL.Path, err)
		}
		sig := "not checked"
		if keys != nil {
			sig = "valid"
			if err := webhook.Verify(keys, r.Header, data, 5*time.Minute, time.Now()); err != nil {
				sig = "INVALID: " + err.Error()
			}
		}
		first := ""
		if len(items) > 0 {
			first = fmt.Sprintf(" first: key=%s split=%s treatment=%s", items[0].Key, items[0].Split, items[0].Treatment)
		}
		fmt.Printf("%s %s webhook-id=%s impressions=%d signature %s%s (answered %d)\n",
			time.Now().Format(time.TimeOnly), r.URL.Path, r.Header.Get(webhook.HeaderID), len(items), sig, first, *status)
		w.WriteHeader(*status)
	})
	fmt.Printf("receiver listening on http://%s\n", *addr)
	srv := &http.Server{Addr: *addr, ReadHeaderTimeout: 5 * time.Second}
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, "receiver:", err)
		os.Exit(1)
	}
}
