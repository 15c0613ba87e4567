// Accounts: a saga participant in Go, written straight from protos/saga/v1 with no SDK.
//
//	accounts -listen 127.0.0.1:50062 -database accounts.db
//	    [-tls-cert accounts.pem -tls-key accounts.key [-client-ca coordinator-ca.pem]]
//
// It serves saga.v1.ParticipantService (OpenAccount, compensated by CloseAccount) and the
// standard gRPC health service, dedupes every call on its request_id in its own SQLite file
// (the barrier, in the same transaction as the account), and stops gracefully on SIGTERM or
// SIGINT: health turns NOT_SERVING, calls in flight finish, then it exits 0. With a
// certificate it serves TLS; with a client CA it also requires the caller's certificate from
// that CA (mTLS): give it a CA that signs the coordinator's client certificate only, and only
// the coordinator reaches it (the CA is checked, not the certificate's name).
package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	sagav1 "saga-coordinator/sagav1"
)

func main() {
	log.SetPrefix("accounts: ")
	log.SetFlags(log.LstdFlags | log.Lmicroseconds | log.LUTC)
	listen := flag.String("listen", "127.0.0.1:50062", "address to serve on, HOST:PORT (port 0 picks one)")
	database := flag.String("database", "accounts.db", "SQLite file of the accounts and the barrier")
	grace := flag.Duration("grace", 10*time.Second, "how long calls in flight may take to finish on SIGTERM")
	certificate := flag.String("tls-cert", "", "serve TLS with this PEM certificate chain")
	key := flag.String("tls-key", "", "the certificate's PEM private key")
	clientCA := flag.String("client-ca", "", "require callers' certificates signed by this PEM CA (mTLS)")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "accounts: unexpected arguments %q\n", flag.Args())
		flag.Usage()
		os.Exit(2)
	}
	tlsConfig, err := serverTLS(*certificate, *key, *clientCA)
	if err != nil {
		fmt.Fprintf(os.Stderr, "accounts: %v\n", err)
		os.Exit(2)
	}
	if err := serve(*listen, *database, *grace, tlsConfig); err != nil {
		log.Fatal(err)
	}
}

// serverTLS is the TLS configuration the flags ask for, or nil for plaintext.
func serverTLS(certificate, key, clientCA string) (*tls.Config, error) {
	if certificate == "" && key == "" {
		if clientCA != "" {
			return nil, errors.New("-client-ca needs -tls-cert and -tls-key")
		}
		return nil, nil
	}
	if certificate == "" || key == "" {
		return nil, errors.New("-tls-cert and -tls-key go together")
	}
	pair, err := tls.LoadX509KeyPair(certificate, key)
	if err != nil {
		return nil, fmt.Errorf("load the TLS certificate: %w", err)
	}
	config := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	if clientCA != "" {
		pem, err := os.ReadFile(clientCA)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", clientCA)
		}
		config.ClientCAs = pool
		config.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return config, nil
}

func serve(listen, database string, grace time.Duration, tlsConfig *tls.Config) error {
	barrier, err := OpenBarrier(database)
	if err != nil {
		return err
	}
	defer barrier.Close()
	accounts, err := NewServer(barrier)
	if err != nil {
		return err
	}
	listener, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	mode := "plaintext"
	var options []grpc.ServerOption
	switch {
	case tlsConfig == nil:
		if host, _, _ := net.SplitHostPort(listen); !isLoopback(host) {
			log.Printf("warning: serving plaintext on %s, which is not a loopback address: "+
				"anyone who reaches it can call it; pass -tls-cert and -tls-key", listen)
		}
	case tlsConfig.ClientAuth == tls.RequireAndVerifyClientCert:
		mode = "mTLS"
	default:
		mode = "TLS"
	}
	if tlsConfig != nil {
		options = append(options, grpc.Creds(credentials.NewTLS(tlsConfig)))
	}

	server := grpc.NewServer(options...)
	sagav1.RegisterParticipantServiceServer(server, accounts)
	healthServer := health.NewServer()
	healthServer.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthServer.SetServingStatus("saga.v1.ParticipantService", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(server, healthServer)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	stopped := make(chan struct{})
	go func() {
		received := <-signals
		log.Printf("%v: stopping, calls in flight have %v to finish", received, grace)
		healthServer.Shutdown() // NOT_SERVING: load balancers and checks look elsewhere
		timer := time.AfterFunc(grace, server.Stop)
		server.GracefulStop()
		timer.Stop()
		close(stopped)
	}()

	log.Printf("serving saga.v1.ParticipantService on %s, %s (database %s)", listener.Addr(), mode, database)
	if err := server.Serve(listener); err != nil {
		return err
	}
	<-stopped
	log.Printf("stopped")
	return nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
